pub fn run(_data: &[u8]) {}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    Vec::new()
}
