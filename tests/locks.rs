//! Two `remapblk serve` processes on one image or spare file: a second plain serve is refused,
//! naming the first; `serve --incoming` starts beside it and changes nothing while it waits to
//! take over. (The handover itself is tested in `src/handover/tests.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{serve_refused, Server, MIB};

fn spare_of(image: &Path) -> PathBuf {
    let mut p = image.as_os_str().to_owned();
    p.push(".spare");
    p.into()
}

/// The bytes of the image and its spare file.
fn contents(image: &Path) -> (Vec<u8>, Vec<u8>) {
    (
        std::fs::read(image).expect("read image"),
        std::fs::read(spare_of(image)).expect("read spare"),
    )
}

#[test]
fn a_second_serve_on_a_held_image_or_spare_exits_1_naming_the_holder() {
    let s = Server::start(4 * MIB, &[]);
    let holder = format!("in use by process {} (", s.pid());

    let (code, err) = serve_refused(&s.image, &s.dir.path().join("b.sock"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&holder), "{err}");
    assert!(
        err.contains(&format!("image {}", s.image.display())),
        "{err}"
    );
    assert!(err.contains("--incoming"), "{err}");

    // Another image on the same spare file: refused before that image is even created.
    let other = s.dir.path().join("other.img");
    let spare = spare_of(&s.image);
    let (code, err) = serve_refused(
        &other,
        &s.dir.path().join("c.sock"),
        &["--spare", spare.to_str().unwrap()],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&holder), "{err}");
    assert!(
        err.contains(&format!("spare file {}", spare.display())) && err.contains("--spare"),
        "{err}"
    );
    assert!(!other.exists(), "a refused start made {}", other.display());

    // The first one serves on, untouched.
    let mut c = s.client(1);
    assert_eq!(c.write(0, 0, &[3u8; 4096]), 0);
    assert_eq!(c.read(0, 0, 4096).unwrap(), vec![3u8; 4096]);
}

/// Locks die with their process: after a SIGKILL, a new serve on the same files starts.
#[test]
fn a_killed_servers_files_are_free_again() {
    let mut s = Server::start(4 * MIB, &[]);
    s.signal(libc::SIGKILL);
    s.wait_exit(Duration::from_secs(5));
    s.spawn();
    assert_eq!(s.ctl_ok("query-status", &[])["handover"]["state"], "writer");
}

/// `serve --incoming` on an image another serve holds starts, says it waits, refuses to change
/// the files, and leaves every byte of image and spare as it was, through its exit too.
#[test]
fn incoming_beside_a_serving_process_starts_and_writes_nothing() {
    let src = Server::start(4 * MIB, &["--spare-blocks", "64"]);
    let mut c = src.client(1);
    assert_eq!(c.write(0, 8 * 512, &[7u8; 4096]), 0);
    src.ctl_ok("remap-add", &["lba=9", "count=3"]);
    drop(c);
    assert_eq!(
        src.ctl_ok("query-status", &[])["handover"]["state"],
        "writer"
    );
    let before = contents(&src.image);

    let dir = tempfile::tempdir().expect("tempdir");
    let mut dest = Server::start_on(dir, src.image.clone(), &["--incoming"]);
    assert!(
        dest.log().contains("waiting to take over"),
        "{}",
        dest.log()
    );
    let st = dest.ctl_ok("query-status", &[]);
    assert_eq!(st["handover"]["state"], "incoming", "{st}");
    assert_eq!(st["remaps"], 3, "it read the table the source left: {st}");
    let (code, _, err) = dest.ctl("remap-add", &["lba=20"]);
    assert_eq!(code, 1);
    assert!(err.contains("waits to take over"), "{err}");
    assert_eq!(contents(&src.image), before);

    // A plain serve is refused while either one is attached, and names them.
    let (code, err) = serve_refused(&src.image, &src.dir.path().join("third.sock"), &[]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&src.pid().to_string()) && err.contains(&dest.pid().to_string()),
        "{err}"
    );

    dest.signal(libc::SIGTERM);
    assert_eq!(dest.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert_eq!(contents(&src.image), before);
    // The source never noticed.
    assert_eq!(
        src.ctl_ok("query-status", &[])["handover"]["state"],
        "writer"
    );
    let mut c = src.client(1);
    assert_eq!(c.read(0, 8 * 512, 4096).unwrap(), vec![7u8; 4096]);
}

#[test]
fn incoming_with_a_missing_image_or_spare_exits_1_saying_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let image = dir.path().join("d.img");
    let sock = dir.path().join("d.sock");
    let (code, err) = serve_refused(&image, &sock, &["--incoming"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!("image {} does not exist", image.display())),
        "{err}"
    );
    assert!(!image.exists(), "--incoming created the image");

    std::fs::File::create(&image)
        .and_then(|f| f.set_len(4 * MIB))
        .expect("make image");
    let (code, err) = serve_refused(&image, &sock, &["--incoming"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "spare file {} does not exist",
            spare_of(&image).display()
        )) && err.contains("--spare"),
        "{err}"
    );
    assert!(!spare_of(&image).exists(), "--incoming created the spare");

    let (code, err) = serve_refused(&image, &sock, &["--incoming", "--size", "8M"]);
    assert_eq!(code, Some(2), "{err}");
}
