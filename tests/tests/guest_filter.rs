//! BPF_PROG_TEST_RUN tests of what an untrusted guest may send: `tap_ingress`
//! (slot from the TAP's ifindex, guest MAC, ARP, IPv6, other EtherTypes, IPv4
//! source, bandwidth limit) and the egress policy and host protection
//! `veth_ingress` applies to what the guest opens, and how a change of them
//! cuts the established flows it denies (which skip the policy). One rule per
//! test; each fails if its rule is removed.
//!
//! `tap_ingress` finds its slot from the skb's ifindex, and the kernel resolves
//! a test run's ifindex in the caller's network namespace: those runs happen in
//! a throwaway namespace holding a device with `SLOT_TAP_IFINDEX_BASE + slot`
//! (never in the machine's own namespace). They need root; without it each test
//! prints why and returns.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, Ordering};

use netagent::bpf::{
    AttachMode, Cidr, DEFAULT_EGRESS_DENY, Datapath, DatapathConfig, EgressRules, FlowTable,
    Program, RateLimit, TEST_RUN_IFINDEX, TestRunOutput,
};
use netagent_common::{
    CONFIG_F_TO_GUEST_MARK, CONFIG_F_UPLINK, Counter, DropReason, FLOW_SCOPE_SLOT_NS, FlowKey,
    GlobalConfig, IPPROTO_UDP, NatEntry, SLOT_ETH0_IFINDEX, SLOT_F_ACTIVE, SLOT_TAP_IFINDEX_BASE,
    STATE_GUEST, SlotInfo, SlotStats,
};
use netagent_tests::packet::{
    self, ETHERTYPE_IPV4, PacketBuilder, arp_request, ethernet_header, ipv6_udp_frame, tcp_flags,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const SLOT: u32 = 7;
const OTHER_SLOT: u32 = 9;
const GUEST: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
const TAP_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Slot 7: HostIP 10.11.0.7, veth 10.12.0.14, vpeer 10.12.0.15.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 11, 0, 7);
const VETH_IP: Ipv4Addr = Ipv4Addr::new(10, 12, 0, 14);
const VPEER: Ipv4Addr = Ipv4Addr::new(10, 12, 0, 15);
/// Slot 9: HostIP 10.11.0.9, vpeer 10.12.0.19.
const HOST_IP9: Ipv4Addr = Ipv4Addr::new(10, 11, 0, 9);
const VPEER9: Ipv4Addr = Ipv4Addr::new(10, 12, 0, 19);
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const UPLINK_IFINDEX: u32 = 4242;
const VETH_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x0e];
const ETH0_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x0f];
const TAP_MAC: [u8; 6] = [0x02, 0xfc, 0, 0, 0, 0x05];
const GUEST_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x15];
const OTHER_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x99];

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn map_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn cidr(s: &str) -> Cidr {
    s.parse().unwrap()
}

fn tap_ifindex(slot: u32) -> u32 {
    SLOT_TAP_IFINDEX_BASE + slot
}

/// A throwaway network namespace holding one device per TAP ifindex asked for
/// (veth ends: the test run only needs the index to exist), deleted on drop.
struct TapNs {
    name: String,
    file: Option<File>,
}

impl TapNs {
    fn new(ifindices: &[u32]) -> TapNs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut ns = TapNs {
            name: format!("gf{:04x}{n}", std::process::id() & 0xffff),
            file: None,
        };
        ip(&["netns", "add", &ns.name]);
        for (i, index) in ifindices.iter().enumerate() {
            let (dev, peer) = (format!("tap{i}"), format!("peer{i}"));
            let index = index.to_string();
            ip(&[
                "-n", &ns.name, "link", "add", "name", &dev, "index", &index, "type", "veth",
                "peer", "name", &peer,
            ]);
        }
        ns.file = Some(File::open(format!("/run/netns/{}", ns.name)).expect("open the netns"));
        ns
    }

    /// Runs `tap_ingress` on `frame` as if it arrived on the device `ifindex`.
    fn run(&self, dp: &Datapath, frame: &[u8], ifindex: u32) -> TestRunOutput {
        let ns = self.file.as_ref().expect("namespace open").as_fd();
        netagent::bpf::in_netns(ns, || dp.test_run_on(Program::TapIngress, frame, ifindex))
            .expect("BPF_PROG_TEST_RUN in the namespace")
    }
}

impl Drop for TapNs {
    fn drop(&mut self) {
        self.file = None;
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The datapath with slots 7 and 9 live (TAP ifindex `SLOT_TAP_IFINDEX_BASE +
/// slot`), an uplink 198.18.0.1, the test-run ifindex as slot 7's host veth,
/// and a namespace with both TAP devices. No policy, no default deny list.
struct World {
    dp: Datapath,
    ns: TapNs,
}

fn world() -> Option<World> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: BPF_PROG_TEST_RUN needs root (CAP_BPF)");
        return None;
    }
    let cfg = DatapathConfig {
        max_slots: 64,
        nat_table_size: 1024,
        host_flow_table_size: 1024,
        policy_table_size: 256,
        port_min: 20000,
        port_max: 32767,
        host_base: Ipv4Addr::new(10, 11, 0, 0),
        vrt_base: Ipv4Addr::new(10, 12, 0, 0),
        pin_dir: None,
        attach_mode: AttachMode::Auto,
    };
    let mut dp = Datapath::load(&cfg).expect("load the datapath");
    let maps = dp.maps_mut();
    maps.write_global(&GlobalConfig {
        uplink_ip: map_ip(UPLINK_IP),
        uplink_ifindex: UPLINK_IFINDEX,
        port_min: cfg.port_min,
        port_max: cfg.port_max,
        flags: CONFIG_F_UPLINK | CONFIG_F_TO_GUEST_MARK,
        host_base: map_ip(cfg.host_base),
        vrt_base: map_ip(cfg.vrt_base),
    })
    .unwrap();
    for (slot, vpeer, host_ip) in [(SLOT, VPEER, HOST_IP), (OTHER_SLOT, VPEER9, HOST_IP9)] {
        maps.set_slot(
            slot,
            &SlotInfo {
                vpeer_ip: map_ip(vpeer),
                host_ip: map_ip(host_ip),
                veth_ifindex: 1000 + slot,
                eth0_ifindex: SLOT_ETH0_IFINDEX,
                tap_ifindex: tap_ifindex(slot),
                flags: SLOT_F_ACTIVE,
                veth_mac: VETH_MAC,
                eth0_mac: ETH0_MAC,
                guest_mac: [0; 6],
                _pad: [0; 2],
            },
        )
        .unwrap();
        maps.set_addr_slot(vpeer, slot).unwrap();
        maps.set_addr_slot(host_ip, slot).unwrap();
    }
    maps.set_veth_slot(TEST_RUN_IFINDEX, SLOT).unwrap();
    let ns = TapNs::new(&[tap_ifindex(SLOT), tap_ifindex(OTHER_SLOT)]);
    Some(World { dp, ns })
}

impl World {
    /// `tap_ingress` of slot 7 on `frame`.
    fn tap(&self, frame: &[u8]) -> TestRunOutput {
        self.ns.run(&self.dp, frame, tap_ifindex(SLOT))
    }

    /// A guest frame through `tap_ingress` (which must redirect it untouched)
    /// and then `veth_ingress`; returns what `veth_ingress` made of it.
    fn guest(&self, frame: &[u8]) -> TestRunOutput {
        let at_tap = self.tap(frame);
        assert_eq!(
            (at_tap.verdict, &at_tap.frame),
            (TC_ACT_REDIRECT, &frame.to_vec()),
            "tap_ingress redirects the guest's frame untouched"
        );
        self.dp
            .test_run(Program::VethIngress, frame)
            .expect("BPF_PROG_TEST_RUN")
    }

    fn stats(&self, slot: u32) -> SlotStats {
        self.dp.slot_stats(slot).unwrap()
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.stats(SLOT).counters[reason.counter()]
    }

    /// Every drop counter of slot 7 but `except` is zero.
    fn no_other_drops(&self, except: DropReason) {
        let s = self.stats(SLOT);
        for r in DropReason::ALL {
            if r != except {
                assert_eq!(s.counters[r.counter()], 0, "{} counted", r.name());
            }
        }
    }
}

fn guest_udp(dst: Ipv4Addr) -> Vec<u8> {
    PacketBuilder::udp(sock(GUEST, 40000), sock(dst, 53), b"q")
        .macs(GUEST_MAC, TAP_MAC)
        .build()
}

/// Asserts a guest packet to `dst` is masqueraded to the world (it passed).
fn assert_masqueraded(w: &World, dst: Ipv4Addr) {
    let out = w.guest(&guest_udp(dst));
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "to {dst}: masqueraded");
    assert_eq!(
        packet::parse(&out.frame).unwrap().src,
        UPLINK_IP,
        "to {dst}"
    );
}

/// Asserts a guest packet to `dst` passes `tap_ingress` and `veth_ingress` drops it.
fn assert_denied(w: &World, dst: Ipv4Addr) {
    assert_eq!(w.guest(&guest_udp(dst)).verdict, TC_ACT_SHOT, "to {dst}");
}

// ------------------------------------------------------------- tap_ingress

#[test]
fn tap_of_no_live_slot_drops_everything() {
    let Some(mut w) = world() else { return };
    let frame = guest_udp(WAN);
    // Slot 9's TAP is live: its frames pass.
    let out = w.ns.run(&w.dp, &frame, tap_ifindex(OTHER_SLOT));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    // Slot 9 gone (SLOTS entry cleared): its TAP drops everything, counted as a
    // spoofed source for slot 0.
    w.dp.maps_mut()
        .set_slot(OTHER_SLOT, &SlotInfo::default())
        .unwrap();
    for f in [frame.clone(), arp_request(GUEST_MAC, GUEST, TAP_IP)] {
        let out = w.ns.run(&w.dp, &f, tap_ifindex(OTHER_SLOT));
        assert_eq!(out.verdict, TC_ACT_SHOT);
    }
    let unattributed = w.dp.unattributed_stats().unwrap();
    assert_eq!(
        unattributed.counters[DropReason::SpoofedSource.counter()],
        2
    );
    // A live slot whose SlotInfo names another TAP: not this one's.
    let mut info = w.dp.maps().slot(SLOT).unwrap();
    info.tap_ifindex = 3003;
    w.dp.maps_mut().set_slot(SLOT, &info).unwrap();
    assert_eq!(w.tap(&frame).verdict, TC_ACT_SHOT);
    let unattributed = w.dp.unattributed_stats().unwrap();
    assert_eq!(
        unattributed.counters[DropReason::SpoofedSource.counter()],
        3
    );
    assert_eq!(w.stats(SLOT), SlotStats::default(), "nothing for slot 7");
}

#[test]
fn spoofed_ipv4_source_is_dropped() {
    let Some(w) = world() else { return };
    assert_eq!(w.tap(&guest_udp(WAN)).verdict, TC_ACT_REDIRECT);
    let spoofed = [
        Ipv4Addr::new(169, 254, 0, 99),
        VPEER,
        HOST_IP,
        VPEER9,
        WAN,
        Ipv4Addr::UNSPECIFIED,
    ];
    for src in spoofed {
        let frame = PacketBuilder::udp(sock(src, 1), sock(WAN, 2), b"x")
            .macs(GUEST_MAC, TAP_MAC)
            .build();
        assert_eq!(w.tap(&frame).verdict, TC_ACT_SHOT, "from {src}");
    }
    // Also to the gateway: a spoofed source never reaches the slot namespace.
    let to_gateway = PacketBuilder::icmp_echo_request(VPEER, TAP_IP, 1, 1)
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    assert_eq!(w.tap(&to_gateway).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::SpoofedSource), spoofed.len() as u64 + 1);
    w.no_other_drops(DropReason::SpoofedSource);
}

#[test]
fn guest_mac_is_enforced_only_when_set() {
    let Some(mut w) = world() else { return };
    let from = |mac| {
        PacketBuilder::udp(sock(GUEST, 1), sock(WAN, 2), b"x")
            .macs(mac, TAP_MAC)
            .build()
    };
    // No guest MAC set: any source MAC passes.
    assert_eq!(w.tap(&from(OTHER_MAC)).verdict, TC_ACT_REDIRECT);
    w.dp.set_guest_mac(SLOT, Some(GUEST_MAC)).unwrap();
    assert_eq!(w.dp.guest_mac(SLOT).unwrap(), Some(GUEST_MAC));
    assert_eq!(w.tap(&from(GUEST_MAC)).verdict, TC_ACT_REDIRECT);
    assert_eq!(w.tap(&from(OTHER_MAC)).verdict, TC_ACT_SHOT);
    let gateway_ping = PacketBuilder::icmp_echo_request(GUEST, TAP_IP, 1, 1)
        .macs(OTHER_MAC, TAP_MAC)
        .build();
    assert_eq!(w.tap(&gateway_ping).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::SpoofedSource), 2);
    // Cleared again: passes.
    w.dp.set_guest_mac(SLOT, None).unwrap();
    assert_eq!(w.dp.guest_mac(SLOT).unwrap(), None);
    assert_eq!(w.tap(&from(OTHER_MAC)).verdict, TC_ACT_REDIRECT);
    w.no_other_drops(DropReason::SpoofedSource);
    // Bad input: a multicast MAC, a slot that is not live.
    assert!(
        w.dp.set_guest_mac(SLOT, Some([0x01, 0, 0x5e, 0, 0, 1]))
            .is_err()
    );
    assert!(w.dp.set_guest_mac(12, Some(GUEST_MAC)).is_err());
    assert_eq!(w.dp.guest_mac(SLOT).unwrap(), None, "nothing changed");
}

/// An ARP request whose ARP sender MAC differs from the Ethernet source.
fn arp_with_sender_mac(eth_src: [u8; 6], sha: [u8; 6], sender: Ipv4Addr) -> Vec<u8> {
    let mut f = arp_request(eth_src, sender, TAP_IP);
    f[22..28].copy_from_slice(&sha);
    f
}

#[test]
fn arp_only_for_the_guests_own_address() {
    let Some(mut w) = world() else { return };
    let own = arp_request(GUEST_MAC, GUEST, TAP_IP);
    let out = w.tap(&own);
    assert_eq!(
        (out.verdict, &out.frame),
        (TC_ACT_OK, &own),
        "to the slot ns"
    );
    let spoofed = [
        // Another sender address (poisoning the gateway's neighbour table).
        arp_request(GUEST_MAC, Ipv4Addr::new(169, 254, 0, 22), TAP_IP),
        arp_request(GUEST_MAC, VPEER, TAP_IP),
        // A probe (sender 0.0.0.0).
        arp_request(GUEST_MAC, Ipv4Addr::UNSPECIFIED, TAP_IP),
        // The ARP sender MAC is not the frame's source.
        arp_with_sender_mac(GUEST_MAC, OTHER_MAC, GUEST),
    ];
    for f in &spoofed {
        assert_eq!(w.tap(f).verdict, TC_ACT_SHOT);
    }
    assert_eq!(w.drops(DropReason::SpoofedArp), spoofed.len() as u64);
    // Not Ethernet/IPv4 ARP (protocol type IPv6).
    let mut odd = own.clone();
    odd[16..18].copy_from_slice(&0x86ddu16.to_be_bytes());
    assert_eq!(w.tap(&odd).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::SpoofedArp), spoofed.len() as u64 + 1);
    // With a guest MAC set, ARP from another MAC is spoofed ARP, even with the
    // guest's address; from the guest MAC it passes.
    w.dp.set_guest_mac(SLOT, Some(GUEST_MAC)).unwrap();
    assert_eq!(w.tap(&own).verdict, TC_ACT_OK);
    let other = arp_request(OTHER_MAC, GUEST, TAP_IP);
    assert_eq!(w.tap(&other).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::SpoofedArp), spoofed.len() as u64 + 2);
    w.no_other_drops(DropReason::SpoofedArp);
}

#[test]
fn ipv6_is_dropped() {
    let Some(w) = world() else { return };
    let out = w.tap(&ipv6_udp_frame(GUEST_MAC, TAP_MAC));
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::Ipv6), 1);
    w.no_other_drops(DropReason::Ipv6);
}

#[test]
fn other_ethertypes_are_dropped() {
    let Some(w) = world() else { return };
    let inner = guest_udp(WAN);
    // 802.1Q-tagged IPv4: the tag would hide the IPv4 header from every check.
    let mut vlan = ethernet_header(TAP_MAC, GUEST_MAC, 0x8100);
    vlan.extend_from_slice(&[0x00, 0x05]);
    vlan.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
    vlan.extend_from_slice(&inner[14..]);
    // LLDP.
    let mut lldp = ethernet_header([0x01, 0x80, 0xc2, 0, 0, 0x0e], GUEST_MAC, 0x88cc);
    lldp.extend_from_slice(&[0; 46]);
    for f in [vlan, lldp] {
        assert_eq!(w.tap(&f).verdict, TC_ACT_SHOT);
    }
    assert_eq!(w.drops(DropReason::UnsupportedEthertype), 2);
    w.no_other_drops(DropReason::UnsupportedEthertype);
}

#[test]
fn guest_to_gateway_stays_in_the_slot_namespace() {
    let Some(w) = world() else { return };
    for dst in [TAP_IP, Ipv4Addr::new(169, 254, 0, 23)] {
        let frame = PacketBuilder::icmp_echo_request(GUEST, dst, 1, 1)
            .macs(GUEST_MAC, TAP_MAC)
            .build();
        let out = w.tap(&frame);
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame), "to {dst}");
    }
    assert_eq!(w.stats(SLOT), SlotStats::default());
}

#[test]
fn malformed_ipv4_is_dropped_at_the_tap_for_the_slot() {
    let Some(w) = world() else { return };
    let mut bad_ihl = guest_udp(WAN);
    bad_ihl[14] = 0x44;
    assert_eq!(w.tap(&bad_ihl).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::Malformed), 1);
}

// ------------------------------------------------- host protection (veth_ingress)

#[test]
fn guest_to_host_addresses_is_host_denied() {
    let Some(mut w) = world() else { return };
    let local = Ipv4Addr::new(203, 0, 113, 5);
    // Without the address in LOCAL_ADDRS it is just the world.
    assert_masqueraded(&w, local);
    w.dp.set_local_addrs(&[local, UPLINK_IP]).unwrap();
    let host = [
        local,
        UPLINK_IP,
        HOST_IP,
        VETH_IP,
        VPEER,
        HOST_IP9,
        VPEER9,
        Ipv4Addr::new(10, 12, 0, 18),
    ];
    for dst in host {
        assert_denied(&w, dst);
    }
    assert_eq!(w.drops(DropReason::HostDenied), host.len() as u64);
    w.no_other_drops(DropReason::HostDenied);
    // Also TCP and ping, and an ICMP error about nothing the host opened.
    let syn = PacketBuilder::tcp(sock(GUEST, 40000), sock(VETH_IP, 22), tcp_flags::SYN)
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    let ping = PacketBuilder::icmp_echo_request(GUEST, HOST_IP9, 7, 1)
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    let quoted = PacketBuilder::udp(sock(VETH_IP, 5000), sock(GUEST, 53), b"q").ipv4_bytes();
    let unreachable = PacketBuilder::icmp(GUEST, VETH_IP, 3, 3)
        .payload(&quoted[..28])
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    for f in [syn, ping, unreachable] {
        assert_eq!(w.guest(&f).verdict, TC_ACT_SHOT);
    }
    assert_eq!(w.drops(DropReason::HostDenied), host.len() as u64 + 3);
    assert_eq!(
        w.stats(SLOT).counters[Counter::FROM_GUEST_PACKETS],
        1,
        "only the first (passed) packet counts as forwarded"
    );
}

#[test]
fn reply_of_a_host_opened_flow_passes() {
    let Some(w) = world() else { return };
    // The host opens a TCP connection to the guest at HostIP (slot_ingress
    // tracks it) ...
    let syn = PacketBuilder::tcp(sock(VETH_IP, 5000), sock(HOST_IP, 22), tcp_flags::SYN)
        .macs(VETH_MAC, ETH0_MAC);
    let out = w.dp.test_run(Program::SlotIngress, &syn.build()).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    // ... the guest's reply passes, as HostIP.
    let reply = PacketBuilder::tcp(
        sock(GUEST, 22),
        sock(VETH_IP, 5000),
        tcp_flags::SYN | tcp_flags::ACK,
    )
    .macs(GUEST_MAC, TAP_MAC);
    let out = w.guest(&reply.build());
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_eq!(packet::parse(&out.frame).unwrap().src, HOST_IP);
    // An ICMP error about it too.
    let quoted =
        PacketBuilder::tcp(sock(VETH_IP, 5000), sock(GUEST, 22), tcp_flags::ACK).ipv4_bytes();
    let unreachable = PacketBuilder::icmp(GUEST, VETH_IP, 3, 3)
        .payload(&quoted[..28])
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    assert_eq!(w.guest(&unreachable).verdict, TC_ACT_OK);
    // Even with a policy that denies everything.
    let mut dp = w;
    dp.dp
        .set_slot_egress(
            SLOT,
            &EgressRules {
                allow: vec![],
                deny: vec![cidr("0.0.0.0/0")],
            },
        )
        .unwrap();
    assert_eq!(dp.guest(&reply.build()).verdict, TC_ACT_OK);
    // The same guest opening a connection of its own to the host is denied.
    let own = PacketBuilder::tcp(sock(GUEST, 22), sock(VETH_IP, 5001), tcp_flags::SYN)
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    assert_eq!(dp.guest(&own).verdict, TC_ACT_SHOT);
    assert_eq!(dp.drops(DropReason::HostDenied), 1);
    dp.no_other_drops(DropReason::HostDenied);
}

#[test]
fn host_address_allowed_as_a_slash_32_passes() {
    let Some(mut w) = world() else { return };
    // A /16 covering the host's range does not open it ...
    w.dp.set_slot_egress(
        SLOT,
        &EgressRules {
            allow: vec![cidr("10.12.0.0/16")],
            deny: vec![],
        },
    )
    .unwrap();
    assert_denied(&w, VETH_IP);
    assert_eq!(w.drops(DropReason::HostDenied), 1);
    // ... the address itself does, and only it.
    w.dp.set_slot_egress(
        SLOT,
        &EgressRules {
            allow: vec![cidr("10.12.0.14/32")],
            deny: vec![],
        },
    )
    .unwrap();
    let out = w.guest(&guest_udp(VETH_IP));
    assert_eq!(out.verdict, TC_ACT_OK, "up the host stack");
    assert_eq!(
        packet::parse(&out.frame).unwrap().src,
        VPEER,
        "as the vpeer"
    );
    assert_denied(&w, VPEER9);
    assert_eq!(w.drops(DropReason::HostDenied), 2);
    w.no_other_drops(DropReason::HostDenied);
}

// ----------------------------------------------------------- egress policy

#[test]
fn default_deny_ranges_are_policy_denied() {
    let Some(mut w) = world() else { return };
    let denied = [
        Ipv4Addr::new(0, 1, 2, 3),
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::new(172, 16, 0, 1),
        Ipv4Addr::new(172, 31, 255, 254),
        Ipv4Addr::new(192, 168, 1, 1),
        Ipv4Addr::new(100, 64, 0, 1),
        Ipv4Addr::new(100, 127, 255, 254),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(169, 254, 1, 1),
        Ipv4Addr::new(224, 0, 0, 251),
        Ipv4Addr::new(239, 255, 255, 250),
        Ipv4Addr::new(240, 0, 0, 1),
        Ipv4Addr::BROADCAST,
    ];
    // Without the default list, the private and shared ranges are the world
    // (masqueraded).
    assert_masqueraded(&w, denied[0]);
    assert_masqueraded(&w, denied[4]);
    w.dp.set_default_egress(&DEFAULT_EGRESS_DENY).unwrap();
    assert_eq!(
        w.dp.default_egress().unwrap().len(),
        DEFAULT_EGRESS_DENY.len()
    );
    for dst in denied {
        assert_denied(&w, dst);
    }
    assert_eq!(w.drops(DropReason::PolicyDenied), denied.len() as u64);
    w.no_other_drops(DropReason::PolicyDenied);
    // Just outside each range: the world.
    for dst in [
        Ipv4Addr::new(11, 0, 0, 1),
        Ipv4Addr::new(172, 32, 0, 1),
        Ipv4Addr::new(192, 169, 0, 1),
        Ipv4Addr::new(100, 128, 0, 1),
        WAN,
    ] {
        assert_masqueraded(&w, dst);
    }
    // The defaults hold for every slot; the other slot's counters are its own.
    assert_eq!(
        w.stats(OTHER_SLOT).counters[DropReason::PolicyDenied.counter()],
        0
    );
    // Replaced by a shorter list: 10/8 is reachable again.
    w.dp.set_default_egress(&[cidr("169.254.169.254/32")])
        .unwrap();
    assert_masqueraded(&w, denied[0]);
    assert_denied(&w, Ipv4Addr::new(169, 254, 169, 254));
}

fn rules(allow: &[&str], deny: &[&str]) -> EgressRules {
    EgressRules {
        allow: allow.iter().map(|s| cidr(s)).collect(),
        deny: deny.iter().map(|s| cidr(s)).collect(),
    }
}

#[test]
fn slot_allow_overrides_the_default_deny() {
    let Some(mut w) = world() else { return };
    w.dp.set_default_egress(&DEFAULT_EGRESS_DENY).unwrap();
    w.dp.set_slot_egress(SLOT, &rules(&["10.1.0.0/16", "169.254.169.254/32"], &[]))
        .unwrap();
    assert_masqueraded(&w, Ipv4Addr::new(10, 1, 2, 3));
    assert_masqueraded(&w, Ipv4Addr::new(169, 254, 169, 254));
    assert_denied(&w, Ipv4Addr::new(10, 2, 0, 1));
    assert_denied(&w, Ipv4Addr::new(169, 254, 169, 253));
    assert_eq!(w.drops(DropReason::PolicyDenied), 2);
    // Slot 9's rules are not slot 7's.
    w.dp.set_slot_egress(OTHER_SLOT, &rules(&["10.2.0.0/16"], &[]))
        .unwrap();
    assert_denied(&w, Ipv4Addr::new(10, 2, 0, 1));
    w.no_other_drops(DropReason::PolicyDenied);
}

#[test]
fn slot_deny_of_a_public_address() {
    let Some(mut w) = world() else { return };
    assert_masqueraded(&w, WAN);
    w.dp.set_slot_egress(SLOT, &rules(&[], &["198.18.0.100/32"]))
        .unwrap();
    assert_denied(&w, WAN);
    assert_masqueraded(&w, Ipv4Addr::new(198, 18, 0, 101));
    assert_eq!(w.drops(DropReason::PolicyDenied), 1);
    w.no_other_drops(DropReason::PolicyDenied);
    // Replacing the rules removes the old ones.
    w.dp.set_slot_egress(SLOT, &EgressRules::default()).unwrap();
    assert_eq!(w.dp.slot_egress(SLOT).unwrap(), EgressRules::default());
    assert_masqueraded(&w, WAN);
}

#[test]
fn longest_prefix_wins() {
    let Some(mut w) = world() else { return };
    w.dp.set_slot_egress(
        SLOT,
        &rules(
            &["198.18.0.100/32", "8.8.0.0/16"],
            &["198.18.0.0/15", "8.8.8.0/24"],
        ),
    )
    .unwrap();
    assert_masqueraded(&w, WAN);
    assert_denied(&w, Ipv4Addr::new(198, 18, 0, 101));
    assert_denied(&w, Ipv4Addr::new(198, 19, 255, 1));
    assert_denied(&w, Ipv4Addr::new(8, 8, 8, 8));
    assert_masqueraded(&w, Ipv4Addr::new(8, 8, 4, 4));
    assert_masqueraded(&w, Ipv4Addr::new(9, 9, 9, 9));
    assert_eq!(w.drops(DropReason::PolicyDenied), 3);
    // What was written reads back, sorted.
    assert_eq!(
        w.dp.slot_egress(SLOT).unwrap(),
        rules(
            &["8.8.0.0/16", "198.18.0.100/32"],
            &["8.8.8.0/24", "198.18.0.0/15"],
        )
    );
}

#[test]
fn bad_rules_are_refused_and_change_nothing() {
    let Some(mut w) = world() else { return };
    let good = rules(&["1.1.1.0/24"], &["198.18.0.100/32"]);
    w.dp.set_slot_egress(SLOT, &good).unwrap();
    let conflicting = rules(&["9.9.9.9/32"], &["9.9.9.9/32"]);
    let err = w.dp.set_slot_egress(SLOT, &conflicting).unwrap_err();
    assert!(err.to_string().contains("both allowed and denied"), "{err}");
    assert_eq!(w.dp.slot_egress(SLOT).unwrap(), good);
    // More rules than the table holds (256 here): refused, old rules back.
    let too_many = EgressRules {
        allow: (0..300u32)
            .map(|i| Cidr::new(Ipv4Addr::from(0x0b00_0000 + (i << 8)), 24).unwrap())
            .collect(),
        deny: vec![],
    };
    assert!(w.dp.set_slot_egress(SLOT, &too_many).is_err());
    assert_eq!(w.dp.slot_egress(SLOT).unwrap(), good);
    assert_denied(&w, WAN);
    // Slot indices outside the maps.
    assert!(w.dp.set_slot_egress(0, &good).is_err());
    assert!(w.dp.set_slot_egress(64, &good).is_err());
}

// ------------------------------------------------------------- rate limit

#[test]
fn rate_limit_passes_a_burst_then_drops() {
    let Some(mut w) = world() else { return };
    // A 100-byte frame; 10 bytes/s: each frame books 10 s, so once the
    // 1514-byte burst is spent (15 frames, and a 16th that overshoots it)
    // nothing passes for 10 s.
    let frame = PacketBuilder::udp(sock(GUEST, 1), sock(WAN, 2), &[0; 58])
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    assert_eq!(frame.len(), 100);
    let limit = RateLimit {
        rate_bytes_per_sec: 10,
        burst_bytes: 1514,
    };
    w.dp.set_rate_limit(SLOT, Some(limit)).unwrap();
    assert_eq!(w.dp.rate_limit(SLOT).unwrap(), Some(limit));
    let verdicts: Vec<i32> = (0..20).map(|_| w.tap(&frame).verdict).collect();
    let mut expected = vec![TC_ACT_REDIRECT; 16];
    expected.extend([TC_ACT_SHOT; 4]);
    assert_eq!(verdicts, expected);
    assert_eq!(w.drops(DropReason::RateLimited), 4);
    // The gateway's traffic and ARP come out of the same budget.
    let arp = arp_request(GUEST_MAC, GUEST, TAP_IP);
    assert_eq!(w.tap(&arp).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::RateLimited), 5);
    w.no_other_drops(DropReason::RateLimited);
    // Slot 9 has no limit.
    let out = w.ns.run(&w.dp, &frame, tap_ifindex(OTHER_SLOT));
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(w.stats(OTHER_SLOT), SlotStats::default());
    // Lifted: everything passes again.
    w.dp.set_rate_limit(SLOT, None).unwrap();
    assert_eq!(w.dp.rate_limit(SLOT).unwrap(), None);
    assert_eq!(w.tap(&frame).verdict, TC_ACT_REDIRECT);
    // A new limit starts with a full burst.
    w.dp.set_rate_limit(SLOT, Some(limit)).unwrap();
    assert_eq!(w.tap(&frame).verdict, TC_ACT_REDIRECT);
    // Bad input.
    for bad in [
        RateLimit {
            rate_bytes_per_sec: 0,
            burst_bytes: 10_000,
        },
        RateLimit {
            rate_bytes_per_sec: 1000,
            burst_bytes: 100,
        },
    ] {
        assert!(w.dp.set_rate_limit(SLOT, Some(bad)).is_err());
    }
    assert_eq!(w.dp.rate_limit(SLOT).unwrap(), Some(limit), "unchanged");
}

#[test]
fn rate_limit_passes_a_frame_longer_than_the_burst_once_the_budget_is_whole() {
    let Some(mut w) = world() else { return };
    // A GSO frame from a TAP with TSO is far longer than a small burst; here
    // 3000 bytes against 1514. It passes on a whole budget (and books 300 s at
    // 10 bytes/s), the next one does not.
    let big = PacketBuilder::udp(sock(GUEST, 1), sock(WAN, 2), &[0; 2958])
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    assert_eq!(big.len(), 3000);
    w.dp.set_rate_limit(
        SLOT,
        Some(RateLimit {
            rate_bytes_per_sec: 10,
            burst_bytes: 1514,
        }),
    )
    .unwrap();
    assert_eq!(w.tap(&big).verdict, TC_ACT_REDIRECT);
    assert_eq!(w.tap(&big).verdict, TC_ACT_SHOT);
    assert_eq!(w.tap(&guest_udp(WAN)).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::RateLimited), 2);
}

// ----------------------------------------------------------------- counters

#[test]
fn drops_are_counted_for_the_slot_of_the_tap() {
    let Some(w) = world() else { return };
    let spoofed = PacketBuilder::udp(sock(VPEER, 1), sock(WAN, 2), b"x")
        .macs(GUEST_MAC, TAP_MAC)
        .build();
    let ipv6 = ipv6_udp_frame(GUEST_MAC, TAP_MAC);
    for (slot, f) in [(OTHER_SLOT, &spoofed), (OTHER_SLOT, &ipv6), (SLOT, &ipv6)] {
        assert_eq!(w.ns.run(&w.dp, f, tap_ifindex(slot)).verdict, TC_ACT_SHOT);
    }
    let s9 = w.stats(OTHER_SLOT);
    assert_eq!(s9.counters[DropReason::SpoofedSource.counter()], 1);
    assert_eq!(s9.counters[DropReason::Ipv6.counter()], 1);
    let s7 = w.stats(SLOT);
    assert_eq!(s7.counters[DropReason::SpoofedSource.counter()], 0);
    assert_eq!(s7.counters[DropReason::Ipv6.counter()], 1);
    assert_eq!(w.dp.unattributed_stats().unwrap(), SlotStats::default());
}

#[test]
fn detach_slot_clears_its_policy_and_rate_limit() {
    let Some(mut w) = world() else { return };
    w.dp.set_default_egress(&DEFAULT_EGRESS_DENY).unwrap();
    for slot in [SLOT, OTHER_SLOT] {
        w.dp.set_slot_egress(slot, &rules(&["10.1.0.0/16"], &["198.18.0.100/32"]))
            .unwrap();
        w.dp.set_rate_limit(
            slot,
            Some(RateLimit {
                rate_bytes_per_sec: 1000,
                burst_bytes: 10_000,
            }),
        )
        .unwrap();
    }
    w.dp.detach_slot(SLOT).unwrap();
    assert_eq!(w.dp.slot_egress(SLOT).unwrap(), EgressRules::default());
    assert_eq!(w.dp.rate_limit(SLOT).unwrap(), None);
    // The other slot's and the defaults stay.
    assert_eq!(w.dp.slot_egress(OTHER_SLOT).unwrap().allow.len(), 1);
    assert!(w.dp.rate_limit(OTHER_SLOT).unwrap().is_some());
    assert_eq!(
        w.dp.default_egress().unwrap().len(),
        DEFAULT_EGRESS_DENY.len()
    );
    assert_eq!(
        w.dp.maps().flow_count(FlowTable::NatEgress).unwrap(),
        0,
        "no flows were made"
    );
}

// ------------------------------------- policy changes and established flows

/// A guest UDP packet from `sport` to `dst`:53.
fn guest_udp_from(sport: u16, dst: Ipv4Addr) -> Vec<u8> {
    PacketBuilder::udp(sock(GUEST, sport), sock(dst, 53), b"q")
        .macs(GUEST_MAC, TAP_MAC)
        .build()
}

/// Seeds a guest masquerade flow of `slot` (both halves, `STATE_GUEST`) from
/// `vpeer`:`sport` to `dst`:53, on uplink port `port`.
fn seed_guest_flow(
    w: &mut World,
    slot: u32,
    vpeer: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    port: u16,
) {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now = now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64;
    let (egress, ingress) = flow_keys(vpeer, sport, dst, port);
    let maps = w.dp.maps_mut();
    let entry = |addr, port: u16| NatEntry {
        last_seen_ns: now,
        addr,
        port: port.to_be(),
        _pad: 0,
        slot,
        state: STATE_GUEST,
    };
    maps.insert_flow(
        FlowTable::NatEgress,
        &egress,
        &entry(map_ip(UPLINK_IP), port),
    )
    .unwrap();
    maps.insert_flow(
        FlowTable::NatIngress,
        &ingress,
        &entry(map_ip(vpeer), sport),
    )
    .unwrap();
}

/// The NAT_EGRESS and NAT_INGRESS keys of a UDP flow `vpeer`:`sport` →
/// `dst`:53 masqueraded to uplink port `port`.
fn flow_keys(vpeer: Ipv4Addr, sport: u16, dst: Ipv4Addr, port: u16) -> (FlowKey, FlowKey) {
    let k = |s: Ipv4Addr, sp: u16, d: Ipv4Addr, dp: u16| {
        FlowKey::new(map_ip(s), map_ip(d), sp.to_be(), dp.to_be(), IPPROTO_UDP)
    };
    (k(vpeer, sport, dst, 53), k(dst, 53, UPLINK_IP, port))
}

/// Whether both halves of the flow are in the maps (asserting they agree).
fn has_flow(w: &World, keys: (FlowKey, FlowKey)) -> bool {
    let e = w.dp.maps().flow(FlowTable::NatEgress, &keys.0).unwrap();
    let i = w.dp.maps().flow(FlowTable::NatIngress, &keys.1).unwrap();
    assert_eq!(
        e.is_some(),
        i.is_some(),
        "one half of a flow without the other"
    );
    e.is_some()
}

/// The masquerade port of a packet that passed.
fn masquerade_port(w: &World, frame: &[u8]) -> u16 {
    let out = w.guest(frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    packet::parse(&out.frame).unwrap().sport
}

/// An established guest flow skips the policy, so every change cuts the flows
/// it denies, both halves: a slot's own rules (that slot's flows only), a new
/// address in LOCAL_ADDRS and the default list (every slot's). The next packet
/// of a cut flow meets the policy; flows still allowed keep their port.
#[test]
fn policy_changes_cut_the_guest_flows_they_deny() {
    let Some(mut w) = world() else { return };
    let wan2 = Ipv4Addr::new(198, 18, 0, 101);
    let wan3 = Ipv4Addr::new(198, 18, 7, 1);
    // Slot 7's guest: flows to WAN, wan2 and wan3, made by the datapath.
    let to_wan = guest_udp_from(1000, WAN);
    let to_wan2 = guest_udp_from(1001, wan2);
    let to_wan3 = guest_udp_from(1002, wan3);
    let (p1, p2, p3) = (
        masquerade_port(&w, &to_wan),
        masquerade_port(&w, &to_wan2),
        masquerade_port(&w, &to_wan3),
    );
    let f1 = flow_keys(VPEER, 1000, WAN, p1);
    let f2 = flow_keys(VPEER, 1001, wan2, p2);
    let f3 = flow_keys(VPEER, 1002, wan3, p3);
    // Slot 9's guest: a flow to WAN too.
    seed_guest_flow(&mut w, OTHER_SLOT, VPEER9, 1000, WAN, 30000);
    let f9 = flow_keys(VPEER9, 1000, WAN, 30000);
    // And a flow of slot 7's own stack to WAN (no STATE_GUEST): the policy
    // does not apply to it, nothing cuts it.
    let own = PacketBuilder::udp(sock(VPEER, 2000), sock(WAN, 53), b"q")
        .macs(ETH0_MAC, VETH_MAC)
        .build();
    let out = w.dp.test_run(Program::VethIngress, &own).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let p_own = packet::parse(&out.frame).unwrap().sport;
    let mut f_own = flow_keys(VPEER, 2000, WAN, p_own);
    f_own.0.scope = FLOW_SCOPE_SLOT_NS; // a key of its own, apart from the guest's

    // Slot 7 denies WAN: its guest flow to WAN goes, the rest stays.
    w.dp.set_slot_egress(SLOT, &rules(&[], &["198.18.0.100/32"]))
        .unwrap();
    assert!(!has_flow(&w, f1), "slot 7's flow to the denied address");
    for f in [f2, f3, f9, f_own] {
        assert!(has_flow(&w, f));
    }
    assert_denied(&w, WAN);
    assert_eq!(w.guest(&to_wan).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::PolicyDenied), 2);
    assert_eq!(
        masquerade_port(&w, &to_wan2),
        p2,
        "an allowed flow keeps its port"
    );

    // Setting the same rules again changes nothing.
    w.dp.set_slot_egress(SLOT, &rules(&[], &["198.18.0.100/32"]))
        .unwrap();
    for f in [f2, f3, f9, f_own] {
        assert!(has_flow(&w, f));
    }

    // wan2 becomes an address of the host: the flow to it goes (it must go up
    // the host stack now, and only a /32 allow lets it), for every slot.
    w.dp.set_local_addrs(&[wan2]).unwrap();
    assert!(!has_flow(&w, f2), "the flow to the new host address");
    for f in [f3, f9, f_own] {
        assert!(has_flow(&w, f));
    }
    assert_eq!(w.guest(&to_wan2).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::HostDenied), 1);

    // The defaults deny 198.18.0.0/24: slot 9's flow to WAN goes; slot 7's to
    // wan3 (outside the /24) stays.
    w.dp.set_default_egress(&[cidr("198.18.0.0/24")]).unwrap();
    assert!(!has_flow(&w, f9), "slot 9's flow to the newly denied range");
    for f in [f3, f_own] {
        assert!(has_flow(&w, f));
    }
    assert_eq!(masquerade_port(&w, &to_wan3), p3);
    // The slot namespace's own flow still passes with its port.
    let out = w.dp.test_run(Program::VethIngress, &own).unwrap();
    assert_eq!(packet::parse(&out.frame).unwrap().sport, p_own);
}

/// The guest's flows to host addresses always meet the policy on the guest's
/// side, but their `HOST_FLOWS` entries (keyed to the vpeer address, as the
/// host's replies arrive) let the replies through: a change that denies the
/// address cuts them too, and only them — not the host's flows to HostIP, not
/// a flow to an address still allowed.
#[test]
fn policy_changes_cut_the_guests_flows_to_host_addresses() {
    let Some(mut w) = world() else { return };
    let allowed = Ipv4Addr::new(10, 12, 0, 2); // slot 1's host veth: a host address
    w.dp.set_slot_egress(SLOT, &rules(&["10.12.0.14/32", "10.12.0.2/32"], &[]))
        .unwrap();
    let reply_key = |host: Ipv4Addr| {
        FlowKey::new(
            map_ip(host),
            map_ip(VPEER),
            53u16.to_be(),
            40000u16.to_be(),
            IPPROTO_UDP,
        )
    };
    for host in [VETH_IP, allowed] {
        let out = w.guest(&guest_udp(host));
        assert_eq!(out.verdict, TC_ACT_OK, "to {host}: up the host stack");
        assert_eq!(packet::parse(&out.frame).unwrap().src, VPEER);
        assert!(
            w.dp.maps()
                .flow(FlowTable::HostFlows, &reply_key(host))
                .unwrap()
                .is_some(),
            "to {host}: tracked"
        );
    }
    // The host's own flow to the guest at HostIP.
    let to_host_ip = PacketBuilder::udp(sock(VETH_IP, 5000), sock(HOST_IP, 53), b"q")
        .macs(VETH_MAC, ETH0_MAC)
        .build();
    let out = w.dp.test_run(Program::SlotIngress, &to_host_ip).unwrap();
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_eq!(w.dp.table_usage().unwrap().host_flows, 3);

    // The slot keeps only the second address.
    w.dp.set_slot_egress(SLOT, &rules(&["10.12.0.2/32"], &[]))
        .unwrap();
    let tracked = |host| {
        w.dp.maps()
            .flow(FlowTable::HostFlows, &reply_key(host))
            .unwrap()
            .is_some()
    };
    assert!(
        !tracked(VETH_IP),
        "the flow to the address no longer allowed"
    );
    assert!(tracked(allowed));
    assert_eq!(w.dp.table_usage().unwrap().host_flows, 2);
    assert_eq!(w.guest(&guest_udp(VETH_IP)).verdict, TC_ACT_SHOT);
    assert_eq!(w.drops(DropReason::HostDenied), 1);
}

/// The userspace evaluation the purge uses (`Datapath::egress_verdict`) gives
/// the datapath's verdict for every address: each is sent as a new flow and
/// the program's verdict and drop counter are compared with it.
#[test]
fn the_userspace_policy_evaluation_is_the_datapaths() {
    let Some(mut w) = world() else { return };
    w.dp.set_default_egress(&DEFAULT_EGRESS_DENY).unwrap();
    w.dp.set_slot_egress(
        SLOT,
        &rules(
            &[
                "10.1.0.0/16",
                "169.254.169.254/32",
                "198.18.0.100/32",
                "8.8.0.0/16",
                "10.12.0.14/32",
                "203.0.113.5/32",
            ],
            &["198.18.0.0/15", "8.8.8.0/24", "1.1.1.1/32"],
        ),
    )
    .unwrap();
    w.dp.set_slot_egress(OTHER_SLOT, &rules(&["10.2.0.0/16"], &["9.9.9.0/24"]))
        .unwrap();
    w.dp.set_local_addrs(&[
        Ipv4Addr::new(203, 0, 113, 5),
        Ipv4Addr::new(203, 0, 113, 6),
        UPLINK_IP,
    ])
    .unwrap();
    let addrs = [
        WAN,
        Ipv4Addr::new(198, 18, 0, 101),
        Ipv4Addr::new(198, 19, 255, 1),
        Ipv4Addr::new(8, 8, 8, 8),
        Ipv4Addr::new(8, 8, 4, 4),
        Ipv4Addr::new(9, 9, 9, 9),
        Ipv4Addr::new(1, 1, 1, 1),
        Ipv4Addr::new(1, 1, 1, 2),
        Ipv4Addr::new(10, 1, 2, 3),
        Ipv4Addr::new(10, 2, 0, 1),
        Ipv4Addr::new(10, 3, 0, 1),
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(169, 254, 169, 253),
        Ipv4Addr::new(172, 16, 0, 1),
        Ipv4Addr::new(100, 64, 0, 1),
        Ipv4Addr::new(127, 0, 0, 1),
        Ipv4Addr::new(0, 1, 2, 3),
        Ipv4Addr::new(240, 0, 0, 1),
        Ipv4Addr::new(203, 0, 113, 5),
        Ipv4Addr::new(203, 0, 113, 6),
        UPLINK_IP,
        HOST_IP,
        VETH_IP,
        VPEER,
        HOST_IP9,
        VPEER9,
        Ipv4Addr::new(11, 0, 0, 1),
    ];
    let mut verdicts = std::collections::BTreeSet::new();
    for (i, dst) in addrs.into_iter().enumerate() {
        let want = w.dp.egress_verdict(SLOT, dst).unwrap();
        let before = w.stats(SLOT);
        let out = w.guest(&guest_udp_from(3000 + i as u16, dst));
        let after = w.stats(SLOT);
        let dropped: Vec<DropReason> = DropReason::ALL
            .into_iter()
            .filter(|r| after.counters[r.counter()] > before.counters[r.counter()])
            .collect();
        match want {
            None => {
                assert_ne!(out.verdict, TC_ACT_SHOT, "{dst}: the datapath drops it");
                assert!(dropped.is_empty(), "{dst}");
            }
            Some(reason) => {
                assert_eq!(out.verdict, TC_ACT_SHOT, "{dst}: the datapath passes it");
                assert_eq!(dropped, [reason], "{dst}");
            }
        }
        verdicts.insert(format!("{want:?}"));
    }
    // Every outcome was met.
    assert_eq!(verdicts.len(), 3, "{verdicts:?}");
}
