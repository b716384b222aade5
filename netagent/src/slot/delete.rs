//! Deleting a slot: every step is tried, "already gone" counts as done, and all
//! failures are reported together. Works from names and addresses alone, so it
//! also removes what a crashed run left behind.

use std::os::fd::AsFd;

use crate::netlink::{Netlink, netns};

use super::manager::SlotManager;
use super::{GuestLink, SlotAddr};

/// Removes slot `addr`'s datapath entries, host route, veth pair, `tap0` of a veth
/// guest link (and with it the far end in the guest's namespace) and the
/// namespace (which takes a TAP with it). Returns one message per step that
/// failed.
pub(super) async fn delete(mgr: &SlotManager, addr: &SlotAddr, guest: &GuestLink) -> Vec<String> {
    let host = mgr.host();
    let mut failures = Vec::new();
    let mut note = |what: &str, r: Result<(), String>| {
        if let Err(e) = r {
            failures.push(format!("{what}: {e}"));
        }
    };

    // Datapath first: from here the programs pass the slot's packets and it gets
    // no new flows; its NAT and host-flow entries and counters go too.
    note(
        "detach datapath",
        mgr.detach_slot(addr.index).map_err(|e| e.to_string()),
    );

    note(
        "delete host route",
        host.route_del_dst(addr.host_ip, 32)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    );
    note(
        "delete host veth",
        host.link_del_by_name(&addr.veth)
            .await
            .map(drop)
            .map_err(|e| e.to_string()),
    );

    // A veth guest link's far end sits in the guest's namespace: delete `tap0`
    // explicitly so it goes now, not whenever the kernel gets to freeing the slot
    // namespace (a re-create would find the guest's `eth0` still there). A TAP
    // goes with the namespace; deleting it here would only add a second
    // synchronize_net to every delete.
    if !matches!(guest, GuestLink::Tap) {
        match netns::open(&addr.namespace) {
            Ok(ns) => {
                let r = match Netlink::connect_in(ns.as_fd()) {
                    Ok(slot) => slot
                        .link_del_by_name(&addr.tap)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                note("delete tap0", r);
            }
            Err(e) if e.is_gone() => {}
            Err(e) => note("open the slot namespace", Err(e.to_string())),
        }
    }
    note(
        "delete namespace",
        netns::delete(&addr.namespace)
            .map(drop)
            .map_err(|e| e.to_string()),
    );
    failures
}
