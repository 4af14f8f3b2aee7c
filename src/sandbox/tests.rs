use super::*;

fn arch() -> TargetArch {
    TargetArch::try_from(std::env::consts::ARCH).expect("a supported architecture")
}

#[test]
fn every_list_compiles_in_both_modes() {
    for miss in [SeccompAction::Trap, SeccompAction::Log] {
        for (name, mask) in [
            ("process-wide", ALL),
            ("session", inherits(SESSION)),
            ("worker", inherits(WORKER)),
            ("control", inherits(CONTROL)),
        ] {
            for io_uring in [false, true] {
                let prog = Lists { io_uring }
                    .program(name, mask, miss.clone(), arch())
                    .unwrap();
                assert!(prog.len() > 10, "{name}: {} instructions", prog.len());
            }
        }
    }
    assert!(!clone3_enosys(arch()).unwrap().is_empty());
}

#[test]
fn the_process_wide_list_lacks_what_remapblk_never_does_after_start_up() {
    let all = allowed(None);
    for never in [
        "execve",
        "execveat",
        "fork",
        "vfork",
        "socket",
        "connect",
        "bind",
        "listen",
        "ptrace",
        "process_vm_writev",
        "mount",
        "unshare",
        "setns",
        "bpf",
        "init_module",
        "kill",
        "chmod",
        "rename",
        "open",
        "creat",
    ] {
        assert!(!all.contains(&never), "{never} is allowed: {all:?}");
    }
    for needed in ["pwritev", "fdatasync", "io_uring_enter", "accept4", "futex"] {
        assert!(all.contains(&needed), "{needed} is missing");
    }
}

#[test]
fn a_parent_list_holds_its_childrens() {
    // A queue thread runs under its session's filter and its own: what it needs must pass
    // both.
    let session = allowed(Some(Role::Session));
    for call in allowed(Some(Role::Worker)) {
        assert!(
            session.contains(&call),
            "worker call {call} not in the session list"
        );
    }
    let all = allowed(None);
    for role in [Role::Session, Role::Worker, Role::Control] {
        for call in allowed(Some(role)) {
            assert!(all.contains(&call), "{call} of {role:?} not process-wide");
        }
    }
}

#[test]
fn threads_that_face_frontends_and_clients_get_less() {
    let worker = allowed(Some(Role::Worker));
    for not in [
        "clone",
        "clone3",
        "memfd_create",
        "io_uring_setup",
        "io_uring_register",
        "epoll_create1",
        "eventfd2",
        "recvmsg",
        "accept4",
        "seccomp",
        "unlink",
        "unlinkat",
        "socketpair",
    ] {
        assert!(!worker.contains(&not), "a queue thread may {not}");
    }
    let control = allowed(Some(Role::Control));
    for not in [
        "recvmsg",
        "memfd_create",
        "io_uring_setup",
        "unlinkat",
        "seccomp",
    ] {
        assert!(!control.contains(&not), "a control thread may {not}");
    }
    let session = allowed(Some(Role::Session));
    for not in ["accept4", "unlinkat", "socketpair"] {
        assert!(!session.contains(&not), "a session thread may {not}");
    }
}

#[test]
fn each_call_is_named_once_per_group_and_exists_here() {
    for g in GROUPS {
        assert!(!g.why.is_empty() && g.roles != 0);
        let mut seen: Vec<i64> = Vec::new();
        for c in g.calls {
            assert!(c.sys.starts_with("SYS_"), "{}", c.sys);
            if c.nr != NONE {
                assert!(!seen.contains(&c.nr), "{} twice in one group", c.sys);
                seen.push(c.nr);
            }
        }
    }
}

#[test]
fn io_uring_only_with_its_engine() {
    let calls = |io_uring| -> Vec<&str> { Lists { io_uring }.calls(ALL).map(Call::name).collect() };
    for call in ["io_uring_setup", "io_uring_register", "io_uring_enter"] {
        assert!(calls(true).contains(&call), "{call}");
        assert!(!calls(false).contains(&call), "{call}");
    }
    assert!(!allowed(Some(Role::Worker)).contains(&"io_uring_setup"));
}
