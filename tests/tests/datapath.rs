//! BPF_PROG_TEST_RUN unit tests of the datapath programs.

use netagent::bpf::{Datapath, DatapathConfig};

#[test]
fn loads_and_verifies() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root (CAP_BPF)");
        return;
    }
    let dp = Datapath::load(&DatapathConfig::default());
    if let Err(e) = &dp {
        eprintln!("{e:#?}");
    }
    dp.unwrap();
}
