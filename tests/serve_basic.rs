mod common;
use common::*;

#[test]
fn smoke() {
    let s = Server::start(8 * MIB, &[]);
    let mut c = s.client(1);
    assert_eq!(c.capacity, 8 * MIB);
    let data = pattern(1, 4096, 8192);
    assert_eq!(c.write(0, 4096, &data), 0);
    assert_eq!(c.read(0, 4096, 8192).unwrap(), data);
}
