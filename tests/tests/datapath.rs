//! BPF_PROG_TEST_RUN unit tests of the datapath programs: one scenario each —
//! build a frame, seed the maps, run the program, check the exact output bytes,
//! the verdict, the checksums (with the independent verifier in
//! `netagent_tests::packet`), the counters and the flow entries.
//!
//! They need CAP_BPF (root); without it each test prints why and returns.

use std::net::{Ipv4Addr, SocketAddrV4};

use netagent::bpf::{
    AttachMode, Datapath, DatapathConfig, FlowTable, Program, TEST_RUN_IFINDEX, TestRunOutput,
};
use netagent::config::Timeouts;
use netagent_common::{
    CONFIG_F_TO_GUEST_MARK, CONFIG_F_UPLINK, Counter, DropReason, FLOW_SCOPE_SLOT_NS, FlowKey,
    GUEST_L2_F_VALID, GlobalConfig, GuestL2, HOST_VETH_INDEX_BASE, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP, MAP_NAT_PORT_CURSORS, MAP_NEXT_HOPS, NAT_PORT_CURSOR_COUNT, NAT_PORT_SECRET_INDEX,
    NAT_REUSE_CLOSED_AFTER_NS, NEXT_HOP_CACHE_NS, NatEntry, NextHop, POLICY_ALLOW, POLICY_DENY,
    PolicyKey, PolicyRule, SLOT_ETH0_IFINDEX, SLOT_F_ACTIVE, SLOT_TAP_IFINDEX_BASE, STATE_FIN_ORIG,
    STATE_FIN_REPLY, STATE_GUEST, STATE_REPLIED, STATE_RST, STATE_SLOT_NS, STATE_SYN, SlotInfo,
    SlotStats, TO_GUEST_MARK, TO_GUEST_MARK_NEIGH, flow_scope, nat_port_hash, next_hop_index,
};
use netagent_tests::packet::{
    self, PacketBuilder, arp_request, ipv6_udp_frame, tcp_flags, verify_checksums,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const SLOT: u32 = 7;
const GUEST: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 21);
const TAP_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 22);
/// Slot 7: HostIP 10.11.0.7, veth 10.12.0.14, vpeer 10.12.0.15.
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 11, 0, 7);
const VETH_IP: Ipv4Addr = Ipv4Addr::new(10, 12, 0, 14);
const VPEER: Ipv4Addr = Ipv4Addr::new(10, 12, 0, 15);
const UPLINK_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const WAN: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const UPLINK_IFINDEX: u32 = 4242;
const VETH_MAC: [u8; 6] = [0x02, 0xaa, 0, 0, 0, 0x0e];
const ETH0_MAC: [u8; 6] = [0x02, 0xbb, 0, 0, 0, 0x0f];
const TAP_MAC: [u8; 6] = [0x02, 0xfc, 0, 0, 0, 0x05];
const GUEST_MAC: [u8; 6] = [0x02, 0xcc, 0, 0, 0, 0x15];
const PORT_MIN: u16 = 20000;
const PORT_MAX: u16 = 32767;

fn sock(ip: Ipv4Addr, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip, port)
}

fn map_ip(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    FlowKey::new(
        map_ip(src),
        map_ip(dst),
        sport.to_be(),
        dport.to_be(),
        proto,
    )
}

/// A fresh `HOST_FLOWS` entry of `slot`'s guest on port `guest_port`.
fn host_flow(slot: u32, guest_port: u16) -> NatEntry {
    NatEntry {
        last_seen_ns: netagent_now(),
        addr: map_ip(GUEST),
        port: guest_port.to_be(),
        _pad: 0,
        slot,
        state: 0,
    }
}

/// The `NAT_EGRESS` key of a masquerade flow of the slot namespace's own stack.
fn stack_key(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, proto: u8) -> FlowKey {
    key(src, sport, dst, dport, proto).in_scope(FLOW_SCOPE_SLOT_NS)
}

fn small_config() -> DatapathConfig {
    DatapathConfig {
        max_slots: 64,
        nat_table_size: 1024,
        host_flow_table_size: 1024,
        policy_table_size: 1024,
        port_min: PORT_MIN,
        port_max: PORT_MAX,
        host_base: Ipv4Addr::new(10, 11, 0, 0),
        vrt_base: Ipv4Addr::new(10, 12, 0, 0),
        pin_dir: None,
        attach_mode: AttachMode::Auto,
    }
}

/// `tap0` of slot 7: `tap_ingress` finds the slot from this ifindex.
const TAP_IFINDEX: u32 = SLOT_TAP_IFINDEX_BASE + SLOT;

/// A loaded datapath and, made on first use, a throwaway namespace holding a
/// device with slot 7's TAP ifindex: `tap_ingress` finds its slot from the
/// skb's ifindex, which a test run resolves in the caller's namespace (and the
/// machine's own must not get such a device). Derefs to the `Datapath`.
struct Dp {
    dp: Datapath,
    tap_ns: std::sync::OnceLock<TapNs>,
}

impl std::ops::Deref for Dp {
    type Target = Datapath;
    fn deref(&self) -> &Datapath {
        &self.dp
    }
}

impl std::ops::DerefMut for Dp {
    fn deref_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }
}

/// A namespace with a veth end of ifindex `TAP_IFINDEX` (deleted on drop).
struct TapNs {
    name: String,
    file: Option<std::fs::File>,
}

impl TapNs {
    fn new() -> TapNs {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut ns = TapNs {
            name: format!("dt{:03x}{n}", std::process::id() & 0xfff),
            file: None,
        };
        ip(&["netns", "add", &ns.name]);
        let index = TAP_IFINDEX.to_string();
        ip(&[
            "-n", &ns.name, "link", "add", "tap0", "index", &index, "type", "veth", "peer", "name",
            "peer0",
        ]);
        ns.file = Some(netns_file(&ns.name));
        ns
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

/// `tap_ingress` on `frame`, arriving on slot 7's `tap0`.
fn tap(dp: &Dp, frame: &[u8]) -> TestRunOutput {
    tap_repeat(dp, frame, 1).0
}

/// `tap_ingress` `repeat` times (it does not rewrite the frame, so the kernel's
/// reruns measure the same path) and the mean time of one run.
fn tap_repeat(dp: &Dp, frame: &[u8], repeat: u32) -> (TestRunOutput, std::time::Duration) {
    let ns = dp.tap_ns.get_or_init(TapNs::new);
    inside(ns.file.as_ref().unwrap(), || {
        dp.test_run_on_repeat(Program::TapIngress, frame, TAP_IFINDEX, repeat)
    })
    .expect("BPF_PROG_TEST_RUN on tap0")
}

/// A loaded datapath with slot 7 seeded (SLOTS, its addresses in ADDR_SLOTS, and
/// the test-run ifindex as its host veth in VETH_SLOTS) and an uplink 198.18.0.1.
fn datapath_with(cfg: DatapathConfig) -> Option<Dp> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: BPF_PROG_TEST_RUN needs root (CAP_BPF)");
        return None;
    }
    let mut dp = Datapath::load(&cfg).expect("load the datapath");
    let maps = dp.maps_mut();
    let global = GlobalConfig {
        uplink_ip: map_ip(UPLINK_IP),
        uplink_ifindex: UPLINK_IFINDEX,
        port_min: cfg.port_min,
        port_max: cfg.port_max,
        // As a fresh load leaves it: replies translated for the guest on the uplink.
        flags: CONFIG_F_UPLINK | CONFIG_F_TO_GUEST_MARK,
        host_base: map_ip(cfg.host_base),
        vrt_base: map_ip(cfg.vrt_base),
    };
    maps.write_global(&global).unwrap();
    maps.set_slot(
        SLOT,
        &SlotInfo {
            vpeer_ip: map_ip(VPEER),
            host_ip: map_ip(HOST_IP),
            veth_ifindex: 1001,
            eth0_ifindex: SLOT_ETH0_IFINDEX,
            tap_ifindex: TAP_IFINDEX,
            flags: SLOT_F_ACTIVE,
            veth_mac: VETH_MAC,
            eth0_mac: ETH0_MAC,
            guest_mac: [0; 6],
            _pad: [0; 2],
        },
    )
    .unwrap();
    maps.set_addr_slot(VPEER, SLOT).unwrap();
    maps.set_addr_slot(HOST_IP, SLOT).unwrap();
    maps.set_veth_slot(TEST_RUN_IFINDEX, SLOT).unwrap();
    Some(Dp {
        dp,
        tap_ns: std::sync::OnceLock::new(),
    })
}

fn datapath() -> Option<Dp> {
    datapath_with(small_config())
}

/// Runs `prog` (the one instance every slot shares).
fn run(dp: &Datapath, prog: Program, frame: &[u8]) -> TestRunOutput {
    dp.test_run(prog, frame).expect("BPF_PROG_TEST_RUN")
}

/// A guest frame's way out of the slot: `tap_ingress` hands it untouched to the
/// host veth (`bpf_redirect_peer(SLOT_ETH0_IFINDEX)`), where `veth_ingress`
/// translates it. Returns what `veth_ingress` made of it.
fn from_tap(dp: &Dp, frame: &[u8]) -> TestRunOutput {
    let at_tap = tap(dp, frame);
    assert_eq!(
        (at_tap.verdict, &at_tap.frame),
        (TC_ACT_REDIRECT, &frame.to_vec()),
        "tap_ingress redirects the guest's frame untouched"
    );
    run(dp, Program::VethIngress, frame)
}

/// A guest packet to the world through tap and veth: masqueraded in one rewrite
/// and redirected to the uplink. Returns the output and the allocated port.
fn guest_masquerade(dp: &Dp, pkt: &PacketBuilder) -> (TestRunOutput, u16) {
    let out = from_tap(dp, &pkt.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "masqueraded and redirected");
    let p = packet::parse(&out.frame).unwrap();
    assert_eq!(p.src, UPLINK_IP);
    (out, p.sport)
}

fn stats(dp: &Datapath) -> SlotStats {
    dp.slot_stats(SLOT).unwrap()
}

fn drops(dp: &Datapath, reason: DropReason) -> u64 {
    stats(dp).counters[reason.counter()]
}

/// Asserts the output equals `expected` byte for byte (the builder computes every
/// checksum from scratch) and that its checksums verify independently.
fn assert_frame(out: &TestRunOutput, expected: &[u8]) {
    assert_eq!(
        hex(&out.frame),
        hex(expected),
        "output frame differs from the expected one"
    );
    verify_checksums(&out.frame).expect("checksums of the output");
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn guest_frame(b: PacketBuilder) -> PacketBuilder {
    b.macs(GUEST_MAC, TAP_MAC)
}

// ------------------------------------------------ tap_ingress + veth_ingress (guest)

#[test]
fn guest_tcp_is_masqueraded_in_one_rewrite_keyed_by_vpeer() {
    let Some(dp) = datapath() else { return };
    let pkt = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 40000),
        sock(WAN, 80),
        tcp_flags::SYN,
    ));
    let frame = pkt.build();
    let (out, port) = guest_masquerade(&dp, &pkt);
    assert!((PORT_MIN..=PORT_MAX).contains(&port));
    // The guest's address becomes the uplink's directly; the MACs are left to
    // bpf_redirect_neigh.
    assert_frame(&out, &pkt.clone().with_src(UPLINK_IP, port).build());
    // The flow is keyed by the slot's vpeer address (unique per slot), and
    // replies come back to the vpeer address.
    let egress = dp
        .maps()
        .flow(
            FlowTable::NatEgress,
            &key(VPEER, 40000, WAN, 80, IPPROTO_TCP),
        )
        .unwrap()
        .expect("NAT_EGRESS entry keyed by vpeer");
    assert_eq!(
        (egress.addr, egress.port, egress.slot, egress.state),
        (
            map_ip(UPLINK_IP),
            port.to_be(),
            SLOT,
            STATE_SYN | STATE_GUEST
        ),
        "the guest opened it (STATE_GUEST: its later packets take the fast path)"
    );
    let ingress = dp
        .maps()
        .flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, port, IPPROTO_TCP),
        )
        .unwrap()
        .expect("NAT_INGRESS entry");
    assert_eq!(
        (ingress.addr, ingress.port),
        (map_ip(VPEER), 40000u16.to_be())
    );
    let s = stats(&dp);
    assert_eq!(s.counters[Counter::FROM_GUEST_PACKETS], 1);
    assert_eq!(s.counters[Counter::FROM_GUEST_BYTES], frame.len() as u64);
    assert_eq!(s.counters[Counter::NAT_ALLOCATIONS], 1);
}

/// An established guest flow takes the fast path: its NAT_EGRESS entry
/// (`STATE_GUEST`) is looked up first, and no policy, LOCAL_ADDRS or
/// HOST_FLOWS lookup follows. Shown by writing, behind the agent's back (so
/// nothing cuts the flow), a deny rule for the destination, the destination
/// into LOCAL_ADDRS and a host → guest flow the packet would be the reply of:
/// the flow's packets still leave masqueraded on their port, while a new flow
/// to the same destination is dropped, and so is the guest's packet with the
/// ports of a flow the slot's own stack made (a flow of its own, not that one).
#[test]
fn established_guest_flow_skips_policy_local_address_and_host_flow_lookups() {
    let Some(mut dp) = datapath() else { return };
    let pkt = guest_frame(PacketBuilder::udp(sock(GUEST, 5353), sock(WAN, 53), b"q"));
    let (_, port) = guest_masquerade(&dp, &pkt);
    // The slot namespace's own flow from port 7000.
    let own = from_vpeer(PacketBuilder::udp(sock(VPEER, 7000), sock(WAN, 53), b"q"));
    masquerade(&dp, &own);

    let maps = dp.maps_mut();
    maps.insert_policy(
        &PolicyKey::new(SLOT, map_ip(WAN), 32),
        &PolicyRule {
            action: POLICY_DENY,
            prefix_len: 32,
        },
    )
    .unwrap();
    maps.set_local_addrs(&[WAN]).unwrap();
    maps.insert_flow(
        FlowTable::HostFlows,
        &key(WAN, 53, HOST_IP, 5353, IPPROTO_UDP),
        &host_flow(SLOT, 5353),
    )
    .unwrap();

    for _ in 0..2 {
        let (out, again) = guest_masquerade(&dp, &pkt);
        assert_eq!(again, port, "the established flow keeps its port");
        assert_frame(&out, &pkt.clone().with_src(UPLINK_IP, port).build());
    }
    // A new flow to the same destination: a host address now, denied.
    let new = guest_frame(PacketBuilder::udp(sock(GUEST, 5354), sock(WAN, 53), b"q"));
    assert_eq!(from_tap(&dp, &new.build()).verdict, TC_ACT_SHOT);
    // The ports of the slot's own flow, from the guest: not that flow (its key
    // has the slot namespace's scope), so the slow path, and denied.
    let on_own = guest_frame(PacketBuilder::udp(sock(GUEST, 7000), sock(WAN, 53), b"q"));
    assert_eq!(from_tap(&dp, &on_own.build()).verdict, TC_ACT_SHOT);
    let s = stats(&dp);
    assert_eq!(s.counters[DropReason::HostDenied.counter()], 2);
    assert_eq!(s.counters[Counter::FROM_GUEST_PACKETS], 3);
    assert_eq!(s.counters[Counter::NAT_ALLOCATIONS], 2);
    let e = dp
        .maps()
        .flow(
            FlowTable::NatEgress,
            &stack_key(VPEER, 7000, WAN, 53, IPPROTO_UDP),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        e.state & (STATE_GUEST | STATE_SLOT_NS),
        STATE_SLOT_NS,
        "the denied guest packet did not touch it"
    );
}

/// The guest's flow and a flow of the slot's own stack with the same ports are
/// two flows (two keys, two ports): the guest's entries are marked
/// `STATE_GUEST`, the stack's `STATE_SLOT_NS`. A flow an older version made for
/// the stack under the guest's key (neither bit) is marked `STATE_GUEST` by a
/// guest packet that passed the policy, which then uses its port. A TCP
/// connection starting over on a closed entry keeps the marks.
#[test]
fn guest_flows_are_marked_and_keep_the_mark() {
    let Some(mut dp) = datapath() else { return };
    fn egress(dp: &Datapath, k: &FlowKey) -> u32 {
        dp.maps()
            .flow(FlowTable::NatEgress, k)
            .unwrap()
            .expect("NAT_EGRESS entry")
            .state
    }
    fn ingress(dp: &Datapath, port: u16, proto: u8) -> u32 {
        dp.maps()
            .flow(FlowTable::NatIngress, &key(WAN, 53, UPLINK_IP, port, proto))
            .unwrap()
            .expect("NAT_INGRESS entry")
            .state
    }
    const OWNER: u32 = STATE_GUEST | STATE_SLOT_NS;
    let own = from_vpeer(PacketBuilder::udp(sock(VPEER, 7000), sock(WAN, 53), b"q"));
    let (_, own_port) = masquerade(&dp, &own);
    let guest = guest_frame(PacketBuilder::udp(sock(GUEST, 7000), sock(WAN, 53), b"q"));
    let (_, guest_port) = guest_masquerade(&dp, &guest);
    assert_ne!(own_port, guest_port, "two flows, two ports");
    assert_eq!(guest_masquerade(&dp, &guest).1, guest_port);
    assert_eq!(masquerade(&dp, &own).1, own_port);
    let udp = IPPROTO_UDP;
    assert_eq!(
        egress(&dp, &stack_key(VPEER, 7000, WAN, 53, udp)) & OWNER,
        STATE_SLOT_NS
    );
    assert_eq!(ingress(&dp, own_port, udp) & OWNER, STATE_SLOT_NS);
    assert_eq!(
        egress(&dp, &key(VPEER, 7000, WAN, 53, udp)) & OWNER,
        STATE_GUEST
    );
    assert_eq!(ingress(&dp, guest_port, udp) & OWNER, 0);

    // An older version's flow of the stack, under the guest's key.
    let old = key(VPEER, 7001, WAN, 53, udp);
    let entry = |addr: Ipv4Addr, port: u16| NatEntry {
        last_seen_ns: netagent_now(),
        addr: map_ip(addr),
        port: port.to_be(),
        _pad: 0,
        slot: SLOT,
        state: 0,
    };
    let maps = dp.maps_mut();
    maps.insert_flow(FlowTable::NatEgress, &old, &entry(UPLINK_IP, 20001))
        .unwrap();
    maps.insert_flow(
        FlowTable::NatIngress,
        &key(WAN, 53, UPLINK_IP, 20001, udp),
        &entry(VPEER, 7001),
    )
    .unwrap();
    let on_old = guest_frame(PacketBuilder::udp(sock(GUEST, 7001), sock(WAN, 53), b"q"));
    assert_eq!(guest_masquerade(&dp, &on_old).1, 20001);
    assert_eq!(egress(&dp, &old) & OWNER, STATE_GUEST);

    for (scope_key, owner, from) in [
        (key(VPEER, 41000, WAN, 80, IPPROTO_TCP), STATE_GUEST, GUEST),
        (
            stack_key(VPEER, 41000, WAN, 80, IPPROTO_TCP),
            STATE_SLOT_NS,
            VPEER,
        ),
    ] {
        let frame = |flags| {
            let b = PacketBuilder::tcp(sock(from, 41000), sock(WAN, 80), flags);
            if from == GUEST {
                guest_frame(b)
            } else {
                from_vpeer(b)
            }
        };
        let send = |b: &PacketBuilder| {
            if from == GUEST {
                guest_masquerade(&dp, b).1
            } else {
                masquerade(&dp, b).1
            }
        };
        let (syn, rst) = (frame(tcp_flags::SYN), frame(tcp_flags::RST));
        let p = send(&syn);
        assert_eq!(send(&rst), p);
        assert_eq!(egress(&dp, &scope_key), STATE_SYN | STATE_RST | owner);
        // A new SYN on the closed entry: the TCP state starts over, the mark stays.
        assert_eq!(send(&syn), p);
        assert_eq!(egress(&dp, &scope_key), STATE_SYN | owner);
    }
}

#[test]
fn guest_udp_is_masqueraded() {
    let Some(dp) = datapath() else { return };
    let pkt = guest_frame(PacketBuilder::udp(
        sock(GUEST, 5353),
        sock(WAN, 53),
        b"query",
    ));
    let (out, port) = guest_masquerade(&dp, &pkt);
    assert_frame(&out, &pkt.with_src(UPLINK_IP, port).build());
}

#[test]
fn guest_icmp_echo_is_masqueraded() {
    let Some(dp) = datapath() else { return };
    let pkt = guest_frame(PacketBuilder::icmp_echo_request(GUEST, WAN, 0x4d2, 1));
    let (out, id) = guest_masquerade(&dp, &pkt);
    assert_frame(&out, &pkt.with_src(UPLINK_IP, id).build());
}

#[test]
fn guest_udp_checksum_zero_stays_zero() {
    let Some(dp) = datapath() else { return };
    let pkt = guest_frame(PacketBuilder::udp(
        sock(GUEST, 5000),
        sock(WAN, 6000),
        b"nock",
    ))
    .udp_no_checksum();
    let (out, port) = guest_masquerade(&dp, &pkt);
    assert_eq!(packet::parse(&out.frame).unwrap().l4_checksum, 0);
    assert_frame(&out, &pkt.with_src(UPLINK_IP, port).build());
}

#[test]
fn guest_ip_options_are_handled() {
    let Some(dp) = datapath() else { return };
    // Router Alert (4 bytes) + a NOP-padded timestamp-ish option: IHL 7.
    let options = [0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x00];
    let pkt = guest_frame(
        PacketBuilder::tcp(sock(GUEST, 41000), sock(WAN, 443), tcp_flags::ACK)
            .ip_options(&options)
            .payload(b"hello over options"),
    );
    let (out, port) = guest_masquerade(&dp, &pkt);
    assert_eq!(packet::parse(&out.frame).unwrap().ihl_bytes, 28);
    assert_frame(&out, &pkt.with_src(UPLINK_IP, port).build());
}

#[test]
fn guest_reply_of_host_flow_goes_up_as_host_ip() {
    let Some(mut dp) = datapath() else { return };
    // The host (10.12.0.14:50000) opened a TCP flow to HostIP:8080.
    let original = key(VETH_IP, 50000, HOST_IP, 8080, IPPROTO_TCP);
    dp.maps_mut()
        .insert_flow(
            FlowTable::HostFlows,
            &original,
            &NatEntry {
                last_seen_ns: 1,
                addr: map_ip(GUEST),
                port: 8080u16.to_be(),
                _pad: 0,
                slot: SLOT,
                state: STATE_SYN,
            },
        )
        .unwrap();
    let pkt = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 8080),
        sock(VETH_IP, 50000),
        tcp_flags::SYN | tcp_flags::ACK,
    ));
    // Up the host stack as HostIP, addressed as if it came over the veth.
    let out = from_tap(&dp, &pkt.build());
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_frame(
        &out,
        &pkt.macs(ETH0_MAC, VETH_MAC).with_src(HOST_IP, 8080).build(),
    );
    let flow = dp
        .maps()
        .flow(FlowTable::HostFlows, &original)
        .unwrap()
        .unwrap();
    assert_eq!(flow.state, STATE_SYN | STATE_REPLIED);
    assert!(flow.last_seen_ns > 1, "the reply refreshed last_seen");
}

#[test]
fn guest_reply_of_host_ping_goes_up_as_host_ip() {
    let Some(mut dp) = datapath() else { return };
    let original = key(VETH_IP, 0x77, HOST_IP, 0, IPPROTO_ICMP);
    dp.maps_mut()
        .insert_flow(
            FlowTable::HostFlows,
            &original,
            &NatEntry {
                last_seen_ns: 1,
                addr: map_ip(GUEST),
                port: 0,
                _pad: 0,
                slot: SLOT,
                state: 0,
            },
        )
        .unwrap();
    let pkt = guest_frame(PacketBuilder::icmp_echo_reply(GUEST, VETH_IP, 0x77, 3));
    let out = from_tap(&dp, &pkt.build());
    assert_eq!(out.verdict, TC_ACT_OK);
    let mut expected = pkt.macs(ETH0_MAC, VETH_MAC);
    expected.src = HOST_IP;
    assert_frame(&out, &expected.build());
}

#[test]
fn tap_passes_the_guests_arp_and_gateway_traffic_and_drops_ipv6_and_spoofed_sources() {
    let Some(dp) = datapath() else { return };
    // The guest's ARP and its traffic to the gateway: the slot namespace's.
    let frames = [
        arp_request(GUEST_MAC, GUEST, TAP_IP),
        guest_frame(PacketBuilder::icmp_echo_request(GUEST, TAP_IP, 1, 1)).build(),
    ];
    for frame in frames {
        let out = tap(&dp, &frame);
        assert_eq!(out.verdict, TC_ACT_OK);
        assert_eq!(out.frame, frame, "passed frames are untouched");
    }
    assert_eq!(stats(&dp), SlotStats::default(), "nothing counted");
    // IPv6, and a source that is not the guest's: dropped and counted (the
    // rules one by one: tests/guest_filter.rs).
    let ipv6 = ipv6_udp_frame(GUEST_MAC, TAP_MAC);
    let spoofed = guest_frame(PacketBuilder::udp(
        sock(Ipv4Addr::new(169, 254, 0, 99), 1),
        sock(WAN, 2),
        b"x",
    ))
    .build();
    for frame in [ipv6, spoofed] {
        assert_eq!(tap(&dp, &frame).verdict, TC_ACT_SHOT);
    }
    assert_eq!(drops(&dp, DropReason::Ipv6), 1);
    assert_eq!(drops(&dp, DropReason::SpoofedSource), 1);
}

#[test]
fn guest_malformed_packets_are_dropped_and_counted_for_the_slot() {
    let Some(dp) = datapath() else { return };
    let good = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 1),
        sock(WAN, 2),
        tcp_flags::SYN,
    ))
    .build();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // (A frame too short for a 20-byte IPv4 header cannot be fed in:
    // BPF_PROG_TEST_RUN itself rejects IPv4 frames under 34 bytes with EINVAL.
    // The shortest case it accepts is a bare header whose TCP part is missing.)
    let mut bare_header = good[..14 + 20].to_vec();
    bare_header[16..18].copy_from_slice(&20u16.to_be_bytes());
    cases.push(("IPv4 header only, TCP header missing", bare_header));
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x44; // IHL 4 (< 5)
    cases.push(("IHL 4", bad_ihl));
    let mut bad_version = good.clone();
    bad_version[14] = 0x65;
    cases.push(("version 6 in an IPv4 frame", bad_version));
    let mut too_long = good.clone();
    too_long[16..18].copy_from_slice(&200u16.to_be_bytes());
    cases.push(("total length beyond the frame", too_long));
    let mut too_short = good.clone();
    too_short[16..18].copy_from_slice(&16u16.to_be_bytes());
    cases.push(("total length below the header", too_short));
    // IHL 15 (60-byte header) in a frame that ends after 40 bytes of it.
    let mut cut_options = good[..14 + 40].to_vec();
    cut_options[14] = 0x4f;
    cut_options[16..18].copy_from_slice(&40u16.to_be_bytes());
    cases.push(("options cut off", cut_options));
    // TCP header cut: total length says 20 + 10.
    let mut cut_tcp = good[..14 + 30].to_vec();
    cut_tcp[16..18].copy_from_slice(&30u16.to_be_bytes());
    cases.push(("TCP header cut off", cut_tcp));
    let n = cases.len() as u64;
    // tap_ingress drops a malformed IPv4 header itself; a cut-off L4 header
    // (which it does not parse) goes on to veth_ingress, which drops it. Both
    // count for this slot.
    for (what, frame) in cases {
        let mut out = tap(&dp, &frame);
        if out.verdict == TC_ACT_REDIRECT {
            out = run(&dp, Program::VethIngress, &frame);
        }
        assert_eq!(out.verdict, TC_ACT_SHOT, "{what}");
    }
    assert_eq!(drops(&dp, DropReason::Malformed), n);
    assert_eq!(stats(&dp).counters[Counter::FROM_GUEST_PACKETS], 0);
}

#[test]
fn guest_fragments_are_dropped_and_counted_for_the_slot() {
    let Some(dp) = datapath() else { return };
    let first =
        guest_frame(PacketBuilder::udp(sock(GUEST, 1), sock(WAN, 2), &[7; 64]).fragment(true, 0))
            .build();
    let later =
        guest_frame(PacketBuilder::udp(sock(GUEST, 1), sock(WAN, 2), &[7; 64]).fragment(false, 9))
            .build();
    for frame in [first, later] {
        assert_eq!(from_tap(&dp, &frame).verdict, TC_ACT_SHOT);
    }
    assert_eq!(drops(&dp, DropReason::Fragment), 2);
}

#[test]
fn tap_finds_the_slot_by_its_ifindex_and_veth_by_its_own() {
    let Some(mut dp) = datapath() else { return };
    let frame = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 1),
        sock(WAN, 2),
        tcp_flags::SYN,
    ))
    .build();
    // tap_ingress knows slot 7 by tap0's ifindex; veth_ingress, without a
    // VETH_SLOTS entry for its own ifindex, passes the frame untouched.
    dp.maps_mut().remove_veth_slot(TEST_RUN_IFINDEX).unwrap();
    let out = from_tap(&dp, &frame);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    assert_eq!(dp.table_usage().unwrap().nat_egress, 0);
    assert_eq!(stats(&dp), SlotStats::default());
    // Slot 7 gone: its TAP drops everything, counted for slot 0.
    dp.maps_mut().set_slot(SLOT, &SlotInfo::default()).unwrap();
    assert_eq!(tap(&dp, &frame).verdict, TC_ACT_SHOT);
    let unattributed = dp.unattributed_stats().unwrap();
    assert_eq!(
        unattributed.counters[DropReason::SpoofedSource.counter()],
        1
    );
}

/// Slot 7's host veth index on the second try (`k = 1`: a retired veth held
/// the first), so the slot is read off through the mask.
const VETH_IFINDEX: u32 = HOST_VETH_INDEX_BASE + (1 << 15) + SLOT;

/// `veth_ingress` on `frame`, arriving on a device of ifindex `VETH_IFINDEX`
/// (made in the test's throwaway namespace on first use).
fn veth_indexed(dp: &Dp, frame: &[u8]) -> TestRunOutput {
    let ns = dp.tap_ns.get_or_init(TapNs::new);
    let file = ns.file.as_ref().unwrap();
    let have = std::process::Command::new("ip")
        .args(["-n", &ns.name, "link", "show", "vh1"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let index = VETH_IFINDEX.to_string();
        ip(&[
            "-n", &ns.name, "link", "add", "vh1", "index", &index, "type", "veth", "peer", "name",
            "vh1p",
        ]);
    }
    inside(file, || {
        dp.test_run_on(Program::VethIngress, frame, VETH_IFINDEX)
    })
    .expect("BPF_PROG_TEST_RUN on the host veth")
}

#[test]
fn veth_finds_the_slot_from_its_ifindex_and_falls_back_to_the_map() {
    let Some(mut dp) = datapath() else { return };
    let pkt = guest_frame(PacketBuilder::udp(
        sock(GUEST, 5353),
        sock(WAN, 53),
        b"query",
    ));
    let frame = pkt.build();
    // Slot 9, live, with its own vpeer: VETH_SLOTS names it for this ifindex.
    let vpeer9 = Ipv4Addr::new(10, 12, 0, 19);
    let mut info7 = dp.maps().slot(SLOT).unwrap();
    let info9 = SlotInfo {
        vpeer_ip: map_ip(vpeer9),
        host_ip: map_ip(Ipv4Addr::new(10, 11, 0, 9)),
        veth_ifindex: VETH_IFINDEX,
        tap_ifindex: SLOT_TAP_IFINDEX_BASE + 9,
        ..info7
    };
    dp.maps_mut().set_slot(9, &info9).unwrap();
    dp.maps_mut().set_veth_slot(VETH_IFINDEX, 9).unwrap();
    let from_guest =
        |dp: &Datapath, slot| dp.slot_stats(slot).unwrap().counters[Counter::FROM_GUEST_PACKETS];

    // The index names slot 7 and slot 7's veth has it: slot 7, without asking
    // VETH_SLOTS (which says 9).
    info7.veth_ifindex = VETH_IFINDEX;
    dp.maps_mut().set_slot(SLOT, &info7).unwrap();
    let out = veth_indexed(&dp, &frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let port = packet::parse(&out.frame).unwrap().sport;
    assert_frame(&out, &pkt.clone().with_src(UPLINK_IP, port).build());
    let k7 = key(VPEER, 5353, WAN, 53, IPPROTO_UDP);
    let e = dp
        .maps()
        .flow(FlowTable::NatEgress, &k7)
        .unwrap()
        .expect("slot 7's flow");
    assert_eq!(e.slot, SLOT);
    assert_eq!((from_guest(&dp, SLOT), from_guest(&dp, 9)), (1, 0));

    // Slot 7's veth has another index: this device is not slot 7's, and
    // VETH_SLOTS decides (slot 9).
    info7.veth_ifindex = 1001;
    dp.maps_mut().set_slot(SLOT, &info7).unwrap();
    let out = veth_indexed(&dp, &frame);
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    let k9 = key(vpeer9, 5353, WAN, 53, IPPROTO_UDP);
    let e = dp
        .maps()
        .flow(FlowTable::NatEgress, &k9)
        .unwrap()
        .expect("slot 9's flow");
    assert_eq!(e.slot, 9);
    assert_eq!((from_guest(&dp, SLOT), from_guest(&dp, 9)), (1, 1));

    // Neither: not a slot's veth, the frame passes untouched and uncounted.
    dp.maps_mut().remove_veth_slot(VETH_IFINDEX).unwrap();
    let out = veth_indexed(&dp, &frame);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    assert_eq!((from_guest(&dp, SLOT), from_guest(&dp, 9)), (1, 1));
    // The index names slot 7, whose veth has it, but slot 7 is not live.
    info7.veth_ifindex = VETH_IFINDEX;
    info7.flags = 0;
    dp.maps_mut().set_slot(SLOT, &info7).unwrap();
    let out = veth_indexed(&dp, &frame);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    assert_eq!((from_guest(&dp, SLOT), from_guest(&dp, 9)), (1, 1));
}

#[test]
fn slot_ingress_finds_the_slot_by_destination() {
    let Some(mut dp) = datapath() else { return };
    // Slot 9 next to slot 7: HostIP 10.11.0.9, vpeer 10.12.0.19.
    let (host9, vpeer9) = (Ipv4Addr::new(10, 11, 0, 9), Ipv4Addr::new(10, 12, 0, 19));
    let maps = dp.maps_mut();
    maps.set_slot(
        9,
        &SlotInfo {
            vpeer_ip: map_ip(vpeer9),
            host_ip: map_ip(host9),
            veth_ifindex: 1009,
            eth0_ifindex: SLOT_ETH0_IFINDEX,
            tap_ifindex: SLOT_TAP_IFINDEX_BASE + 9,
            flags: SLOT_F_ACTIVE,
            veth_mac: VETH_MAC,
            eth0_mac: ETH0_MAC,
            guest_mac: [0; 6],
            _pad: [0; 2],
        },
    )
    .unwrap();
    maps.set_addr_slot(vpeer9, 9).unwrap();
    maps.set_addr_slot(host9, 9).unwrap();
    // Each guest asked a host address from port 5353 (as `veth_ingress` tracks it).
    for (vpeer, slot) in [(VPEER, SLOT), (vpeer9, 9)] {
        maps.insert_flow(
            FlowTable::HostFlows,
            &key(WAN, 53, vpeer, 5353, IPPROTO_UDP),
            &host_flow(slot, 5353),
        )
        .unwrap();
    }
    for (dst, slot) in [(VPEER, SLOT), (vpeer9, 9), (HOST_IP, SLOT), (host9, 9)] {
        let before = dp.slot_stats(slot).unwrap().counters[Counter::TO_GUEST_PACKETS];
        let pkt = PacketBuilder::udp(sock(WAN, 53), sock(dst, 5353), b"a").macs(VETH_MAC, ETH0_MAC);
        let out = run(&dp, Program::SlotIngress, &pkt.build());
        assert_eq!(out.verdict, TC_ACT_REDIRECT, "to {dst}");
        assert_frame(&out, &pkt.with_dst(GUEST, 5353).build());
        let after = dp.slot_stats(slot).unwrap().counters[Counter::TO_GUEST_PACKETS];
        assert_eq!(after, before + 1, "counted for slot {slot}");
    }
    // Slot 9's host flow is slot 9's.
    let flow = dp
        .maps()
        .flow(
            FlowTable::HostFlows,
            &key(WAN, 53, host9, 5353, IPPROTO_UDP),
        )
        .unwrap()
        .expect("host flow of slot 9");
    assert_eq!(flow.slot, 9);
    // An address no slot has passes untouched.
    dp.maps_mut().remove_addr_slot(vpeer9).unwrap();
    let frame = PacketBuilder::udp(sock(WAN, 53), sock(vpeer9, 5353), b"a").build();
    let out = run(&dp, Program::SlotIngress, &frame);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
}

// ---------------------------------------------------------------- veth_ingress

fn from_vpeer(b: PacketBuilder) -> PacketBuilder {
    b.macs(ETH0_MAC, VETH_MAC)
}

/// Runs one egress packet through `veth_ingress` and returns the output and the
/// allocated port.
fn masquerade(dp: &Datapath, pkt: &PacketBuilder) -> (TestRunOutput, u16) {
    let out = run(dp, Program::VethIngress, &pkt.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT, "masqueraded and redirected");
    let p = packet::parse(&out.frame).unwrap();
    assert_eq!(p.src, UPLINK_IP);
    (out, p.sport)
}

#[test]
fn veth_masquerades_tcp_with_a_new_port() {
    let Some(dp) = datapath() else { return };
    let pkt = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 40000),
        sock(WAN, 80),
        tcp_flags::SYN,
    ));
    let (out, port) = masquerade(&dp, &pkt);
    assert!(
        (PORT_MIN..=PORT_MAX).contains(&port),
        "port {port} in the range"
    );
    assert_frame(&out, &pkt.clone().with_src(UPLINK_IP, port).build());

    let egress = dp
        .maps()
        .flow(
            FlowTable::NatEgress,
            &stack_key(VPEER, 40000, WAN, 80, IPPROTO_TCP),
        )
        .unwrap()
        .expect("NAT_EGRESS entry, keyed as the slot namespace's");
    assert_eq!(
        (egress.addr, egress.port, egress.slot, egress.state),
        (
            map_ip(UPLINK_IP),
            port.to_be(),
            SLOT,
            STATE_SYN | STATE_SLOT_NS
        ),
        "the slot's own stack opened it: no STATE_GUEST (no fast path for the guest)"
    );
    let ingress = dp
        .maps()
        .flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, port, IPPROTO_TCP),
        )
        .unwrap()
        .expect("NAT_INGRESS entry");
    assert_eq!(
        (ingress.addr, ingress.port, ingress.slot, ingress.state),
        (map_ip(VPEER), 40000u16.to_be(), SLOT, STATE_SLOT_NS)
    );
    let s = stats(&dp);
    assert_eq!(s.counters[Counter::NAT_ALLOCATIONS], 1);
    assert_eq!(s.counters[Counter::NAT_FAILURES], 0);
}

#[test]
fn veth_reuses_the_entry_of_a_known_flow() {
    let Some(dp) = datapath() else { return };
    let syn = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 40001),
        sock(WAN, 80),
        tcp_flags::SYN,
    ));
    let (_, port) = masquerade(&dp, &syn);
    let ack = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 40001),
        sock(WAN, 80),
        tcp_flags::ACK | tcp_flags::FIN,
    ));
    let (out, port2) = masquerade(&dp, &ack);
    assert_eq!(port, port2, "same flow, same port");
    assert_frame(&out, &ack.with_src(UPLINK_IP, port).build());
    let usage = dp.table_usage().unwrap();
    assert_eq!((usage.nat_egress, usage.nat_ingress), (1, 1));
    assert_eq!(stats(&dp).counters[Counter::NAT_ALLOCATIONS], 1);
    let egress = dp
        .maps()
        .flow(
            FlowTable::NatEgress,
            &stack_key(VPEER, 40001, WAN, 80, IPPROTO_TCP),
        )
        .unwrap()
        .unwrap();
    assert_eq!(egress.state, STATE_SYN | STATE_FIN_ORIG | STATE_SLOT_NS);
}

#[test]
fn veth_masquerades_udp_and_icmp_echo() {
    let Some(dp) = datapath() else { return };
    let udp = from_vpeer(PacketBuilder::udp(sock(VPEER, 5353), sock(WAN, 53), b"q"));
    let (out, port) = masquerade(&dp, &udp);
    assert_frame(&out, &udp.with_src(UPLINK_IP, port).build());

    let ping = from_vpeer(PacketBuilder::icmp_echo_request(VPEER, WAN, 0x4d2, 9));
    let (out, id) = masquerade(&dp, &ping);
    assert!(
        (PORT_MIN..=PORT_MAX).contains(&id),
        "echo id {id} from the range"
    );
    assert_frame(&out, &ping.with_src(UPLINK_IP, id).build());
    assert!(
        dp.maps()
            .flow(
                FlowTable::NatIngress,
                &key(WAN, 0, UPLINK_IP, id, IPPROTO_ICMP)
            )
            .unwrap()
            .is_some()
    );
    assert_eq!(stats(&dp).counters[Counter::NAT_ALLOCATIONS], 2);
}

#[test]
fn veth_udp_checksum_zero_stays_zero_through_masquerade() {
    let Some(dp) = datapath() else { return };
    let udp =
        from_vpeer(PacketBuilder::udp(sock(VPEER, 7000), sock(WAN, 7001), b"z")).udp_no_checksum();
    let (out, port) = masquerade(&dp, &udp);
    assert_eq!(packet::parse(&out.frame).unwrap().l4_checksum, 0);
    assert_frame(&out, &udp.with_src(UPLINK_IP, port).build());
}

#[test]
fn veth_drops_when_ports_are_exhausted() {
    let mut cfg = small_config();
    cfg.port_min = 40000;
    cfg.port_max = 40000;
    let Some(mut dp) = datapath_with(cfg) else {
        return;
    };
    // The only port is taken for this remote by another flow.
    dp.maps_mut()
        .insert_flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, 40000, IPPROTO_TCP),
            &NatEntry {
                last_seen_ns: 1,
                addr: map_ip(VPEER),
                port: 1111u16.to_be(),
                _pad: 0,
                slot: SLOT,
                state: 0,
            },
        )
        .unwrap();
    let pkt = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 40002),
        sock(WAN, 80),
        tcp_flags::SYN,
    ));
    let out = run(&dp, Program::VethIngress, &pkt.build());
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&dp, DropReason::NatPortsExhausted), 1);
    let s = stats(&dp);
    assert_eq!(
        (
            s.counters[Counter::NAT_FAILURES],
            s.counters[Counter::NAT_ALLOCATIONS]
        ),
        (1, 0)
    );
    let usage = dp.table_usage().unwrap();
    assert_eq!(
        (usage.nat_egress, usage.nat_ingress),
        (0, 1),
        "nothing added"
    );
    // Another remote can still use the port.
    let other = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 40002),
        sock(Ipv4Addr::new(198, 18, 0, 101), 80),
        tcp_flags::SYN,
    ));
    let (_, port) = masquerade(&dp, &other);
    assert_eq!(port, 40000);
}

/// Seeds a masquerade flow of the guest WAN:80 ← UPLINK:40000 ← VPEER:1111
/// with both halves' TCP state and last-seen time.
fn seed_tcp_flow(dp: &mut Datapath, fwd_state: u32, rev_state: u32, last_seen_ns: u64) {
    put_tcp_flow(dp, 0, 1111, 40000, (fwd_state, rev_state), last_seen_ns);
}

/// Writes both halves of the masquerade flow VPEER:`sport` → WAN:80 (uplink
/// `port`) with the halves' TCP `states` (forward, reverse) and last-seen time:
/// the guest's (`owner` 0) or the slot namespace's (`STATE_SLOT_NS`).
fn put_tcp_flow(
    dp: &mut Datapath,
    owner: u32,
    sport: u16,
    port: u16,
    states: (u32, u32),
    last_seen_ns: u64,
) {
    let entry = |addr: Ipv4Addr, port: u16, state: u32| NatEntry {
        last_seen_ns,
        addr: map_ip(addr),
        port: port.to_be(),
        _pad: 0,
        slot: SLOT,
        state: state | owner,
    };
    let forward = key(VPEER, sport, WAN, 80, IPPROTO_TCP).in_scope(flow_scope(owner));
    dp.maps_mut()
        .insert_flow(
            FlowTable::NatEgress,
            &forward,
            &entry(UPLINK_IP, port, states.0),
        )
        .unwrap();
    dp.maps_mut()
        .insert_flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, port, IPPROTO_TCP),
            &entry(VPEER, sport, states.1),
        )
        .unwrap();
}

#[test]
fn veth_reuses_the_port_of_a_closed_idle_flow_but_not_of_a_live_one() {
    let mut cfg = small_config();
    cfg.port_min = 40000;
    cfg.port_max = 40000;
    let syn = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 2222),
        sock(WAN, 80),
        tcp_flags::SYN,
    ));
    let closed = STATE_SYN | STATE_FIN_ORIG;
    let closed_reply = STATE_REPLIED | STATE_FIN_REPLY;
    let now = netagent_now();

    // Closed (FIN both ways) and idle for longer than NAT_REUSE_CLOSED_AFTER_NS:
    // the new flow takes the port, the old flow's two entries are gone.
    let Some(mut dp) = datapath_with(cfg.clone()) else {
        return;
    };
    seed_tcp_flow(
        &mut dp,
        closed,
        closed_reply,
        now - NAT_REUSE_CLOSED_AFTER_NS - 1_000_000_000,
    );
    let (out, port) = masquerade(&dp, &syn);
    assert_eq!(port, 40000);
    assert_frame(&out, &syn.clone().with_src(UPLINK_IP, 40000).build());
    let old = key(VPEER, 1111, WAN, 80, IPPROTO_TCP);
    assert!(
        dp.maps()
            .flow(FlowTable::NatEgress, &old)
            .unwrap()
            .is_none()
    );
    let usage = dp.table_usage().unwrap();
    assert_eq!((usage.nat_egress, usage.nat_ingress), (1, 1));
    let back = dp
        .maps()
        .flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, 40000, IPPROTO_TCP),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        back.port,
        2222u16.to_be(),
        "the reply tuple now maps to the new flow"
    );

    // Reset by either side and idle: reusable too.
    let Some(mut dp) = datapath_with(cfg.clone()) else {
        return;
    };
    seed_tcp_flow(
        &mut dp,
        STATE_SYN,
        STATE_REPLIED | STATE_RST,
        now - 10_000_000_000,
    );
    assert_eq!(masquerade(&dp, &syn).1, 40000);

    // Closed but only just: not yet (late segments of the old flow may still come).
    // Established and idle: never (only the reaper frees it, by its timeout).
    // (Idle times count from after the load: loading takes a while on a busy
    // machine.)
    for (fwd, rev, idle_ns) in [
        (closed, closed_reply, 0),
        (STATE_SYN, STATE_REPLIED, 100_000_000_000),
    ] {
        let Some(mut dp) = datapath_with(cfg.clone()) else {
            return;
        };
        seed_tcp_flow(&mut dp, fwd, rev, netagent_now() - idle_ns);
        let out = run(&dp, Program::VethIngress, &syn.build());
        assert_eq!(out.verdict, TC_ACT_SHOT);
        assert_eq!(drops(&dp, DropReason::NatPortsExhausted), 1);
        assert!(
            dp.maps()
                .flow(FlowTable::NatEgress, &old)
                .unwrap()
                .is_some()
        );
    }
}

/// `NAT_PORT_CURSORS`, opened through its pin: the agent never touches it, the
/// datapath alone seeds and advances it (the tests here set it up beforehand).
fn port_cursors(dp: &Datapath) -> aya::maps::Array<aya::maps::MapData, u64> {
    let pin = dp.pin_dir().join(MAP_NAT_PORT_CURSORS);
    let data = aya::maps::MapData::from_pin(&pin).expect("open the NAT_PORT_CURSORS pin");
    aya::maps::Array::try_from(aya::maps::Map::Array(data)).unwrap()
}

/// The cursor index and the hash of the destination `remote` (TCP) under the
/// allocator's key `secret`.
fn port_hash(secret: u64, remote: SocketAddrV4) -> (u32, u64) {
    let h = nat_port_hash(
        secret as u32,
        map_ip(*remote.ip()),
        remote.port().to_be(),
        IPPROTO_TCP,
    );
    (h & (NAT_PORT_CURSOR_COUNT - 1), u64::from(h))
}

/// The port the cursor value `at` gives a destination of hash `hash` in
/// `min..=max`.
fn port_at(at: u64, hash: u64, min: u16, max: u16) -> u16 {
    (u64::from(min) + at.wrapping_add(hash) % (u64::from(max - min) + 1)) as u16
}

/// The port after `port` in `min..=max`, wrapping.
fn next_port(port: u16, min: u16, max: u16) -> u16 {
    if port == max { min } else { port + 1 }
}

fn syn_to(sport: u16, remote: SocketAddrV4) -> PacketBuilder {
    from_vpeer(PacketBuilder::tcp(
        sock(VPEER, sport),
        remote,
        tcp_flags::SYN,
    ))
}

#[test]
fn veth_gives_a_destinations_new_flows_consecutive_ports() {
    let Some(dp) = datapath() else { return };
    let range = u64::from(PORT_MAX - PORT_MIN) + 1;
    let secret = 0x5eed_1234;
    let a = sock(WAN, 80);
    let (index_a, hash_a) = port_hash(secret, a);
    // A second destination with a cursor of its own.
    let (b, (index_b, hash_b)) = (443..)
        .map(|p| (sock(WAN, p), port_hash(secret, sock(WAN, p))))
        .find(|(_, (i, _))| *i != index_a)
        .unwrap();
    // Known cursors (the key and cursors are random otherwise): `a` at 5, `b`
    // two ports before the end of the range, so that it wraps. (Not 0: a
    // zero cursor is seeded.)
    let cursor_a = 5;
    let cursor_b = match (2 * range - 2 - hash_b % range) % range {
        0 => range,
        c => c,
    };
    let mut cursors = port_cursors(&dp);
    cursors.set(NAT_PORT_SECRET_INDEX, secret, 0).unwrap();
    cursors.set(index_a, cursor_a, 0).unwrap();
    cursors.set(index_b, cursor_b, 0).unwrap();

    // New flows to the two destinations, interleaved.
    let (mut ports_a, mut ports_b) = (Vec::new(), Vec::new());
    for i in 0..6u16 {
        ports_a.push(masquerade(&dp, &syn_to(41000 + i, a)).1);
        ports_b.push(masquerade(&dp, &syn_to(42000 + i, b)).1);
    }
    for ports in [&ports_a, &ports_b] {
        for w in ports.windows(2) {
            assert_eq!(
                w[1],
                next_port(w[0], PORT_MIN, PORT_MAX),
                "each destination's flows get consecutive ports: {ports:?}"
            );
        }
    }
    assert_eq!(
        ports_b[..4],
        [PORT_MAX - 1, PORT_MAX, PORT_MIN, PORT_MIN + 1],
        "wrapping at the end of the range"
    );
    // Exactly where the cursor and the destination's hash put them.
    for i in 0..6 {
        assert_eq!(
            ports_a[i],
            port_at(cursor_a + i as u64, hash_a, PORT_MIN, PORT_MAX)
        );
        assert_eq!(
            ports_b[i],
            port_at(cursor_b + i as u64, hash_b, PORT_MIN, PORT_MAX)
        );
    }
    // One try each: each cursor advanced by its own flows only.
    assert_eq!(cursors.get(&index_a, 0).unwrap(), cursor_a + 6);
    assert_eq!(cursors.get(&index_b, 0).unwrap(), cursor_b + 6);
    assert_eq!(
        cursors.get(&NAT_PORT_SECRET_INDEX, 0).unwrap(),
        secret,
        "a set key stays"
    );
    assert_eq!(stats(&dp).counters[Counter::NAT_ALLOCATIONS], 12);
}

#[test]
fn veth_seeds_the_port_cursor_and_the_hash_key_at_random() {
    let Some(dp) = datapath() else { return };
    let cursors = port_cursors(&dp);
    assert!(
        cursors.iter().all(|v| v.unwrap() == 0),
        "nothing is set before the first allocation"
    );
    let remote = sock(WAN, 80);
    let (_, port) = masquerade(&dp, &syn_to(40000, remote));

    let secret = cursors.get(&NAT_PORT_SECRET_INDEX, 0).unwrap();
    assert_ne!(secret, 0, "the hash key was seeded");
    let (index, hash) = port_hash(secret, remote);
    let cursor = cursors.get(&index, 0).unwrap();
    assert_ne!(
        cursor, 1,
        "the destination's cursor was seeded before its first use, not counted from zero"
    );
    assert_eq!(port, port_at(cursor - 1, hash, PORT_MIN, PORT_MAX));
    let used: Vec<u32> = (0..NAT_PORT_CURSOR_COUNT)
        .filter(|i| cursors.get(i, 0).unwrap() != 0)
        .collect();
    assert_eq!(used, vec![index], "only the destination's cursor is set");
}

/// Rewrites the slot namespace's masquerade flow VPEER:`sport` → WAN:80
/// (uplink `port`) as closed (FIN both ways) and idle since `last_seen_ns`.
fn close_tcp_flow(dp: &mut Datapath, sport: u16, port: u16, last_seen_ns: u64) {
    let states = (STATE_SYN | STATE_FIN_ORIG, STATE_REPLIED | STATE_FIN_REPLY);
    put_tcp_flow(dp, STATE_SLOT_NS, sport, port, states, last_seen_ns);
}

#[test]
fn veth_reuses_a_destinations_oldest_closed_port_first() {
    let mut cfg = small_config();
    (cfg.port_min, cfg.port_max) = (40000, 40003);
    let Some(mut dp) = datapath_with(cfg) else {
        return;
    };
    let remote = sock(WAN, 80);
    // Four flows take the four ports, in order from the (random) cursor.
    let ports: Vec<u16> = (0..4)
        .map(|i| masquerade(&dp, &syn_to(3000 + i, remote)).1)
        .collect();
    for w in ports.windows(2) {
        assert_eq!(w[1], next_port(w[0], 40000, 40003), "{ports:?}");
    }
    // All four are live: a fifth flow finds none. (Its 16 sequential tries
    // advance the cursor by 16, a multiple of the range: back to `ports[0]`.)
    let out = run(&dp, Program::VethIngress, &syn_to(3100, remote).build());
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&dp, DropReason::NatPortsExhausted), 1);

    // Closed and idle, the first allocated having closed first: new flows take
    // them back oldest first — twice round.
    let mut sports: Vec<u16> = (3000..3004).collect();
    for round in 1..=2u16 {
        let now = netagent_now();
        for (i, (&sport, &port)) in sports.iter().zip(&ports).enumerate() {
            let idle = NAT_REUSE_CLOSED_AFTER_NS + (5 - i as u64) * 1_000_000_000;
            close_tcp_flow(&mut dp, sport, port, now - idle);
        }
        let new: Vec<u16> = (0..4).map(|i| 3000 + round * 100 + i).collect();
        for (i, &sport) in new.iter().enumerate() {
            let (out, port) = masquerade(&dp, &syn_to(sport, remote));
            assert_eq!(
                port, ports[i],
                "round {round}: flow {i} takes the port used longest ago"
            );
            assert_frame(
                &out,
                &syn_to(sport, remote).with_src(UPLINK_IP, port).build(),
            );
            assert!(
                dp.maps()
                    .flow(
                        FlowTable::NatEgress,
                        &stack_key(VPEER, sports[i], WAN, 80, IPPROTO_TCP)
                    )
                    .unwrap()
                    .is_none(),
                "the old flow of port {port} is gone"
            );
        }
        sports = new;
    }
    let usage = dp.table_usage().unwrap();
    assert_eq!((usage.nat_egress, usage.nat_ingress), (4, 4));
    assert_eq!(stats(&dp).counters[Counter::NAT_ALLOCATIONS], 12);
}

#[test]
fn veth_jumps_over_a_run_of_live_ports() {
    let mut cfg = small_config();
    (cfg.port_min, cfg.port_max) = (40000, 40063);
    let Some(mut dp) = datapath_with(cfg) else {
        return;
    };
    let remote = sock(WAN, 80);
    // 64 live flows hold the 64 ports; the cursor is back at the first one.
    let ports: Vec<u16> = (0..64)
        .map(|i| masquerade(&dp, &syn_to(3000 + i, remote)).1)
        .collect();
    // The last 24 go away: the 40 ports at the cursor stay live, more than
    // the sequential tries cover.
    for (i, &port) in ports.iter().enumerate().skip(40) {
        let maps = dp.maps_mut();
        maps.remove_flow(
            FlowTable::NatEgress,
            &key(VPEER, 3000 + i as u16, WAN, 80, IPPROTO_TCP),
        )
        .unwrap();
        maps.remove_flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, port, IPPROTO_TCP),
        )
        .unwrap();
    }
    let (_, port) = masquerade(&dp, &syn_to(4000, remote));
    assert!(
        ports[40..].contains(&port),
        "port {port} is one of the free ones, past the live run"
    );
    assert_eq!(drops(&dp, DropReason::NatPortsExhausted), 0);
    assert_eq!(stats(&dp).counters[Counter::NAT_ALLOCATIONS], 65);
}

#[test]
fn veth_drops_when_the_table_is_full_and_undoes_the_half_insert() {
    let mut cfg = small_config();
    cfg.nat_table_size = 1;
    let Some(mut dp) = datapath_with(cfg) else {
        return;
    };
    // NAT_EGRESS is full with another flow: the reply entry gets inserted, the
    // egress insert fails, and the reply entry must be removed again.
    dp.maps_mut()
        .insert_flow(
            FlowTable::NatEgress,
            &key(VPEER, 1, WAN, 1, IPPROTO_UDP),
            &NatEntry {
                last_seen_ns: 1,
                addr: map_ip(UPLINK_IP),
                port: 20001u16.to_be(),
                _pad: 0,
                slot: SLOT,
                state: 0,
            },
        )
        .unwrap();
    let pkt = from_vpeer(PacketBuilder::udp(sock(VPEER, 2), sock(WAN, 2), b"x"));
    let out = run(&dp, Program::VethIngress, &pkt.build());
    assert_eq!(out.verdict, TC_ACT_SHOT);
    assert_eq!(drops(&dp, DropReason::NatTableFull), 1);
    assert_eq!(stats(&dp).counters[Counter::NAT_FAILURES], 1);
    let usage = dp.table_usage().unwrap();
    assert_eq!(
        (usage.nat_egress, usage.nat_ingress),
        (1, 0),
        "half insert undone"
    );
}

#[test]
fn veth_passes_host_bound_traffic_untouched() {
    let Some(mut dp) = datapath() else { return };
    let local = Ipv4Addr::new(192, 0, 2, 10);
    dp.set_local_addrs(&[local, UPLINK_IP]).unwrap();
    assert_eq!(dp.maps().local_addrs().unwrap(), vec![local, UPLINK_IP]);
    let frames = [
        // To an address of the agent namespace.
        from_vpeer(PacketBuilder::tcp(
            sock(VPEER, 1),
            sock(local, 22),
            tcp_flags::SYN,
        ))
        .build(),
        from_vpeer(PacketBuilder::udp(
            sock(VPEER, 1),
            sock(UPLINK_IP, 53),
            b"q",
        ))
        .build(),
        // To the veth and HostIP ranges.
        from_vpeer(PacketBuilder::tcp(
            sock(VPEER, 1),
            sock(VETH_IP, 9),
            tcp_flags::SYN,
        ))
        .build(),
        from_vpeer(PacketBuilder::tcp(
            sock(VPEER, 1),
            sock(Ipv4Addr::new(10, 11, 0, 9), 9),
            tcp_flags::SYN,
        ))
        .build(),
        // A reply of a host → guest flow (source HostIP).
        from_vpeer(PacketBuilder::tcp(
            sock(HOST_IP, 8080),
            sock(VETH_IP, 5),
            tcp_flags::ACK,
        ))
        .build(),
        arp_request(ETH0_MAC, VPEER, VETH_IP),
    ];
    for frame in frames {
        let out = run(&dp, Program::VethIngress, &frame);
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    }
    assert_eq!(dp.table_usage().unwrap().nat_egress, 0);
    // LOCAL_ADDRS can be replaced.
    dp.set_local_addrs(&[local]).unwrap();
    assert_eq!(dp.maps().local_addrs().unwrap(), vec![local]);
}

#[test]
fn veth_drops_untranslatable_and_fragments() {
    let Some(dp) = datapath() else { return };
    // An ICMP redirect, and a "port unreachable" about a datagram of no flow.
    let redirect = from_vpeer(PacketBuilder::icmp(VPEER, WAN, 5, 1).payload(&[0; 28])).build();
    let stray = PacketBuilder::udp(sock(WAN, 53), sock(VPEER, 999), b"late");
    let unreachable =
        from_vpeer(PacketBuilder::icmp(VPEER, WAN, 3, 3).payload(&quote(&stray.ipv4_bytes())))
            .build();
    for frame in [redirect, unreachable] {
        assert_eq!(run(&dp, Program::VethIngress, &frame).verdict, TC_ACT_SHOT);
    }
    assert_eq!(drops(&dp, DropReason::UnsupportedProtocol), 2);
    // An ICMP error whose quote is not an IPv4 header.
    let bogus = from_vpeer(PacketBuilder::icmp(VPEER, WAN, 3, 3).payload(&[0; 28])).build();
    assert_eq!(run(&dp, Program::VethIngress, &bogus).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&dp, DropReason::Malformed), 1);
    let frag =
        from_vpeer(PacketBuilder::udp(sock(VPEER, 1), sock(WAN, 2), &[1; 32]).fragment(true, 0))
            .build();
    assert_eq!(run(&dp, Program::VethIngress, &frag).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&dp, DropReason::Fragment), 1);
}

#[test]
fn veth_passes_when_no_uplink_is_configured() {
    let Some(mut dp) = datapath() else { return };
    let mut g = dp.maps().global().unwrap();
    g.flags = 0;
    dp.maps_mut().write_global(&g).unwrap();
    let frame = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 1),
        sock(WAN, 80),
        tcp_flags::SYN,
    ))
    .build();
    let out = run(&dp, Program::VethIngress, &frame);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
}

// ---------------------------------------------------------------- uplink_ingress

const WAN_MAC: [u8; 6] = [0x02, 0xdd, 0, 0, 0, 0x64];
const UPLINK_MAC: [u8; 6] = [0x02, 0xee, 0, 0, 0, 0x01];

#[test]
fn uplink_restores_vpeer_on_a_reply() {
    let Some(dp) = datapath() else { return };
    let syn = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 40010),
        sock(WAN, 80),
        tcp_flags::SYN,
    ));
    let (_, port) = masquerade(&dp, &syn);
    let reply = PacketBuilder::tcp(
        sock(WAN, 80),
        sock(UPLINK_IP, port),
        tcp_flags::SYN | tcp_flags::ACK,
    )
    .macs(WAN_MAC, UPLINK_MAC)
    .payload(b"");
    let out = run(&dp, Program::UplinkIngress, &reply.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out,
        &reply
            .macs(VETH_MAC, ETH0_MAC)
            .with_dst(VPEER, 40010)
            .build(),
    );
    // The guest's MACs unknown: slot_ingress translates again, unmarked.
    assert_eq!(out.mark, 0);
    let ingress = dp
        .maps()
        .flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, port, IPPROTO_TCP),
        )
        .unwrap()
        .unwrap();
    assert_eq!(ingress.state & STATE_REPLIED, STATE_REPLIED);
}

#[test]
fn uplink_restores_udp_and_icmp_replies() {
    let Some(dp) = datapath() else { return };
    let q = from_vpeer(PacketBuilder::udp(sock(VPEER, 5353), sock(WAN, 53), b"q"));
    let (_, port) = masquerade(&dp, &q);
    let a = PacketBuilder::udp(sock(WAN, 53), sock(UPLINK_IP, port), b"answer")
        .macs(WAN_MAC, UPLINK_MAC);
    let out = run(&dp, Program::UplinkIngress, &a.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out,
        &a.macs(VETH_MAC, ETH0_MAC).with_dst(VPEER, 5353).build(),
    );

    let ping = from_vpeer(PacketBuilder::icmp_echo_request(VPEER, WAN, 0x99, 1));
    let (_, id) = masquerade(&dp, &ping);
    let pong = PacketBuilder::icmp_echo_reply(WAN, UPLINK_IP, id, 1).macs(WAN_MAC, UPLINK_MAC);
    let out = run(&dp, Program::UplinkIngress, &pong.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out,
        &pong.macs(VETH_MAC, ETH0_MAC).with_dst(VPEER, 0x99).build(),
    );
}

#[test]
fn uplink_leaves_host_traffic_untouched() {
    let Some(dp) = datapath() else { return };
    let frames = [
        // Port in the range, no flow.
        PacketBuilder::tcp(sock(WAN, 80), sock(UPLINK_IP, 25000), tcp_flags::ACK).build(),
        // Port outside the range (the host's own socket).
        PacketBuilder::tcp(sock(WAN, 80), sock(UPLINK_IP, 45000), tcp_flags::ACK).build(),
        // Another destination.
        PacketBuilder::udp(
            sock(WAN, 53),
            sock(Ipv4Addr::new(198, 18, 0, 2), 25000),
            b"a",
        )
        .build(),
        // Echo request to the host (not a reply).
        PacketBuilder::icmp_echo_request(WAN, UPLINK_IP, 25000, 1).build(),
        // Malformed and fragments are the host's business too.
        PacketBuilder::udp(sock(WAN, 53), sock(UPLINK_IP, 25000), &[0; 40])
            .fragment(false, 3)
            .build(),
        truncated_tcp_to_uplink(),
        arp_request(WAN_MAC, WAN, UPLINK_IP),
        ipv6_udp_frame(WAN_MAC, UPLINK_MAC),
    ];
    for frame in frames {
        let out = run(&dp, Program::UplinkIngress, &frame);
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    }
    assert_eq!(dp.unattributed_stats().unwrap(), SlotStats::default());
    assert_eq!(stats(&dp), SlotStats::default());
}

/// A TCP segment to the uplink whose TCP header is cut off after 10 bytes.
fn truncated_tcp_to_uplink() -> Vec<u8> {
    let mut f = PacketBuilder::tcp(sock(WAN, 80), sock(UPLINK_IP, 25000), tcp_flags::ACK).build()
        [..44]
        .to_vec();
    f[16..18].copy_from_slice(&30u16.to_be_bytes());
    f
}

/// The part of `datagram` (an IPv4 datagram) an ICMP error quotes: the IP
/// header and the first 8 bytes of L4 (RFC 792's minimum).
fn quote(datagram: &[u8]) -> Vec<u8> {
    let ihl = usize::from(datagram[0] & 0x0f) * 4;
    datagram[..ihl + 8].to_vec()
}

/// `quoted` with its source address (and port, or echo identifier) replaced and
/// its header checksum recomputed; the quoted L4 checksum is left as it was.
fn requote_src(quoted: &[u8], addr: Ipv4Addr, port: u16) -> Vec<u8> {
    requote(quoted, true, addr, port)
}

/// As `requote_src`, for the destination.
fn requote_dst(quoted: &[u8], addr: Ipv4Addr, port: u16) -> Vec<u8> {
    requote(quoted, false, addr, port)
}

fn requote(quoted: &[u8], source: bool, addr: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut q = quoted.to_vec();
    let ihl = usize::from(q[0] & 0x0f) * 4;
    let addr_off = if source { 12 } else { 16 };
    q[addr_off..addr_off + 4].copy_from_slice(&addr.octets());
    let port_off = match (q[9] == IPPROTO_ICMP, source) {
        (true, _) => ihl + 4,
        (false, true) => ihl,
        (false, false) => ihl + 2,
    };
    q[port_off..port_off + 2].copy_from_slice(&port.to_be_bytes());
    q[10..12].copy_from_slice(&[0, 0]);
    let c = packet::internet_checksum(&q[..ihl]);
    q[10..12].copy_from_slice(&c.to_be_bytes());
    q
}

const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);

/// An ICMP error about a masqueraded datagram (a router's "fragmentation
/// needed") goes back to whoever sent the datagram. For the guest's flows
/// `uplink_ingress` restores the guest's address and port in the outer header
/// and the quote, addresses the frame to the guest and marks it, and
/// `slot_ingress` passes it on; for the slot namespace's own flows it restores
/// the vpeer address, unmarked, and `slot_ingress` leaves it to that stack.
#[test]
fn icmp_errors_about_masqueraded_flows_reach_their_sender_rewritten() {
    let Some(dp) = datapath() else { return };
    for from in [GUEST, VPEER] {
        let flows = [
            PacketBuilder::udp(sock(from, 5353), sock(WAN, 53), b"big query"),
            PacketBuilder::tcp(sock(from, 40200), sock(WAN, 443), tcp_flags::ACK).payload(&[1; 64]),
            PacketBuilder::icmp_echo_request(from, WAN, 0x321, 5),
        ];
        for (i, original) in flows.into_iter().enumerate() {
            let orig_port = packet::parse(&original.build()).unwrap().sport;
            let (on_wire, port) = if from == GUEST {
                guest_masquerade(&dp, &guest_frame(original))
            } else {
                masquerade(&dp, &from_vpeer(original))
            };
            assert_ne!(port, orig_port, "the quote has the masquerade port");
            // A router on the way says "fragmentation needed" (type 3 code 4) about it.
            let quoted = quote(&on_wire.frame[14..]);
            let err = PacketBuilder::icmp(ROUTER, UPLINK_IP, 3, 4)
                .payload(&quoted)
                .macs(WAN_MAC, UPLINK_MAC);
            let at_eth0 = run(&dp, Program::UplinkIngress, &err.build());
            assert_eq!(at_eth0.verdict, TC_ACT_REDIRECT, "{from} flow {i}");
            let (src_mac, dst_mac, mark) = if from == GUEST {
                (TAP_MAC, GUEST_MAC, TO_GUEST_MARK | SLOT)
            } else {
                (VETH_MAC, ETH0_MAC, 0)
            };
            let expected = PacketBuilder::icmp(ROUTER, from, 3, 4)
                .payload(&requote_src(&quoted, from, orig_port))
                .macs(src_mac, dst_mac);
            assert_frame(&at_eth0, &expected.build());
            assert_eq!(at_eth0.mark, mark, "{from} flow {i}");
            let inner = &at_eth0.frame[14 + 20 + 8..];
            assert_eq!(
                packet::internet_checksum(&inner[..20]),
                0,
                "quoted header checksum"
            );

            let at_slot = dp
                .test_run_marked(Program::SlotIngress, &at_eth0.frame, at_eth0.mark)
                .unwrap();
            let verdict = if from == GUEST {
                TC_ACT_REDIRECT
            } else {
                TC_ACT_OK
            };
            assert_eq!(
                (at_slot.verdict, &at_slot.frame, at_slot.mark),
                (verdict, &at_eth0.frame, 0),
                "{from} flow {i}"
            );
        }
    }
}

#[test]
fn icmp_errors_about_other_traffic_pass_untouched() {
    let Some(dp) = datapath() else { return };
    // About a datagram the host itself sent (port outside the range), and about
    // one in the range without a flow.
    for port in [45000, 25000] {
        let sent = PacketBuilder::udp(sock(UPLINK_IP, port), sock(WAN, 53), b"q");
        let err = PacketBuilder::icmp(ROUTER, UPLINK_IP, 3, 3)
            .payload(&quote(&sent.ipv4_bytes()))
            .build();
        let out = run(&dp, Program::UplinkIngress, &err);
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &err));
    }
    // A quote cut short.
    let err = PacketBuilder::icmp(ROUTER, UPLINK_IP, 11, 0)
        .payload(&[0x45, 0, 0, 20])
        .build();
    let out = run(&dp, Program::UplinkIngress, &err);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &err));
}

/// `veth_ingress` learns the guest's MACs from its frames. Before that a
/// packet for the guest keeps the MACs of the veth hop and is left to
/// `bpf_redirect_neigh`; after it, it is addressed to the guest: by
/// `slot_ingress` for HostIP traffic, by `uplink_ingress` for replies (marked;
/// marked `TO_GUEST_MARK_NEIGH` when the MACs are not known, which
/// `slot_ingress` passes on as it is).
#[test]
fn veth_learns_the_guest_l2_and_the_datapath_uses_it() {
    let Some(mut dp) = datapath() else { return };
    let to_guest = PacketBuilder::udp(sock(VETH_IP, 53), sock(HOST_IP, 5353), b"answer")
        .macs(VETH_MAC, ETH0_MAC);
    // Before the guest has sent anything: MACs left to bpf_redirect_neigh.
    let out = run(&dp, Program::SlotIngress, &to_guest.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(&out, &to_guest.clone().with_dst(GUEST, 5353).build());
    assert_eq!(dp.maps().guest_l2(SLOT).unwrap(), GuestL2::default());

    let from_guest = guest_frame(PacketBuilder::udp(sock(GUEST, 5353), sock(WAN, 53), b"q"));
    let (_, port) = guest_masquerade(&dp, &from_guest);
    assert_eq!(
        dp.maps().guest_l2(SLOT).unwrap(),
        GuestL2 {
            guest_mac: GUEST_MAC,
            gateway_mac: TAP_MAC,
            flags: GUEST_L2_F_VALID,
        }
    );
    let out = run(&dp, Program::SlotIngress, &to_guest.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out,
        &to_guest
            .clone()
            .macs(TAP_MAC, GUEST_MAC)
            .with_dst(GUEST, 5353)
            .build(),
    );
    // A reply of the guest's flow, translated and addressed on the uplink.
    let reply = PacketBuilder::udp(sock(WAN, 53), sock(UPLINK_IP, port), b"reply")
        .macs(WAN_MAC, UPLINK_MAC);
    let out = run(&dp, Program::UplinkIngress, &reply.build());
    assert_eq!(
        (out.verdict, out.mark),
        (TC_ACT_REDIRECT, TO_GUEST_MARK | SLOT)
    );
    let for_guest = reply.clone().with_dst(GUEST, 5353);
    assert_frame(&out, &for_guest.clone().macs(TAP_MAC, GUEST_MAC).build());
    // With the MACs forgotten: marked for the kernel's neighbour lookup.
    dp.maps_mut().clear_guest_l2(SLOT).unwrap();
    let out = run(&dp, Program::UplinkIngress, &reply.build());
    let mark = TO_GUEST_MARK | TO_GUEST_MARK_NEIGH | SLOT;
    assert_eq!((out.verdict, out.mark), (TC_ACT_REDIRECT, mark));
    assert_frame(&out, &for_guest.macs(VETH_MAC, ETH0_MAC).build());
    let at_slot = dp
        .test_run_marked(Program::SlotIngress, &out.frame, out.mark)
        .unwrap();
    assert_eq!(
        (at_slot.verdict, &at_slot.frame, at_slot.mark),
        (TC_ACT_REDIRECT, &out.frame, 0)
    );

    // A new MAC (the guest rebooted with another NIC address) replaces the old.
    let new_mac = [0x02, 0xcc, 0, 0, 0, 0x99];
    from_tap(&dp, &from_guest.clone().macs(new_mac, TAP_MAC).build());
    assert_eq!(dp.maps().guest_l2(SLOT).unwrap().guest_mac, new_mac);
    // Frames that are not the guest's IPv4 teach nothing.
    let arp = arp_request([0x02, 0xee, 0, 0, 0, 1], GUEST, TAP_IP);
    assert_eq!(tap(&dp, &arp).verdict, TC_ACT_OK);
    run(&dp, Program::VethIngress, &arp);
    assert_eq!(dp.maps().guest_l2(SLOT).unwrap().guest_mac, new_mac);

    dp.detach_slot(SLOT).unwrap();
    assert_eq!(
        dp.maps().guest_l2(SLOT).unwrap(),
        GuestL2::default(),
        "forgotten on detach"
    );
}

#[test]
fn guest_icmp_errors_about_its_flows_leave_translated() {
    let Some(dp) = datapath() else { return };
    // The guest's DNS query went out masqueraded...
    let query = guest_frame(PacketBuilder::udp(sock(GUEST, 5353), sock(WAN, 53), b"q"));
    let (_, port) = guest_masquerade(&dp, &query);
    // ...the late answer reached the guest (as 198.18.0.100:53 → guest:5353), whose
    // socket is gone: it answers "port unreachable", quoting what it got.
    let answer = PacketBuilder::udp(sock(WAN, 53), sock(GUEST, 5353), b"late answer");
    let quoted = quote(&answer.ipv4_bytes());
    let err = guest_frame(PacketBuilder::icmp(GUEST, WAN, 3, 3).payload(&quoted));
    let on_wire = from_tap(&dp, &err.build());
    assert_eq!(on_wire.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &on_wire,
        &PacketBuilder::icmp(UPLINK_IP, WAN, 3, 3)
            .payload(&requote_dst(&quoted, UPLINK_IP, port))
            .macs(GUEST_MAC, TAP_MAC)
            .build(),
    );
}

#[test]
fn guest_icmp_errors_to_the_host_leave_as_host_ip() {
    let Some(mut dp) = datapath() else { return };
    let original = key(VETH_IP, 41000, HOST_IP, 53, IPPROTO_UDP);
    dp.maps_mut()
        .insert_flow(
            FlowTable::HostFlows,
            &original,
            &NatEntry {
                last_seen_ns: 1,
                addr: map_ip(GUEST),
                port: 53u16.to_be(),
                _pad: 0,
                slot: SLOT,
                state: 0,
            },
        )
        .unwrap();
    let got = PacketBuilder::udp(sock(VETH_IP, 41000), sock(GUEST, 53), b"probe");
    let quoted = quote(&got.ipv4_bytes());
    let err = guest_frame(PacketBuilder::icmp(GUEST, VETH_IP, 3, 3).payload(&quoted));
    // Up the host stack as HostIP.
    let out = from_tap(&dp, &err.build());
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_frame(
        &out,
        &PacketBuilder::icmp(HOST_IP, VETH_IP, 3, 3)
            .payload(&requote_dst(&quoted, HOST_IP, 53))
            .macs(ETH0_MAC, VETH_MAC)
            .build(),
    );
}

// ---------------------------------------------------------------- slot_ingress

/// Traffic for the vpeer address is the slot namespace's, except the host's
/// side of a flow the guest opened to the host. A connection the host opens to
/// the vpeer address passes `slot_ingress` untouched, and nothing is tracked;
/// the guest's connection to a host address it may reach (an allow rule of its
/// own) leaves as the vpeer, tracked in `HOST_FLOWS` as the host's replies will
/// arrive, and those replies, and an ICMP error about the guest's datagram, go
/// to the guest. The same from another port of the host passes.
#[test]
fn vpeer_traffic_reaches_the_guest_only_on_its_flows_to_the_host() {
    let Some(mut dp) = datapath() else { return };
    let to_vpeer = |b: PacketBuilder| b.macs(VETH_MAC, ETH0_MAC);
    fn passes(dp: &Datapath, frame: &[u8]) {
        let out = run(dp, Program::SlotIngress, frame);
        assert_eq!((out.verdict, &out.frame[..]), (TC_ACT_OK, frame));
    }
    passes(
        &dp,
        &to_vpeer(PacketBuilder::tcp(
            sock(VETH_IP, 50000),
            sock(VPEER, 22),
            tcp_flags::SYN,
        ))
        .build(),
    );
    assert_eq!(dp.table_usage().unwrap().host_flows, 0);

    dp.maps_mut()
        .insert_policy(
            &PolicyKey::new(SLOT, map_ip(VETH_IP), 32),
            &PolicyRule {
                action: POLICY_ALLOW,
                prefix_len: 32,
            },
        )
        .unwrap();
    let syn = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 40010),
        sock(VETH_IP, 80),
        tcp_flags::SYN,
    ));
    let out = from_tap(&dp, &syn.build());
    assert_eq!(out.verdict, TC_ACT_OK, "up the host stack");
    assert_frame(
        &out,
        &syn.with_src(VPEER, 40010).macs(ETH0_MAC, VETH_MAC).build(),
    );
    let flow_key = key(VETH_IP, 80, VPEER, 40010, IPPROTO_TCP);
    let flow = || {
        dp.maps()
            .flow(FlowTable::HostFlows, &flow_key)
            .unwrap()
            .expect("HOST_FLOWS entry")
    };
    let f = flow();
    assert_eq!(
        (f.addr, f.port, f.slot, f.state),
        (map_ip(GUEST), 40010u16.to_be(), SLOT, STATE_SYN)
    );

    let synack = to_vpeer(PacketBuilder::tcp(
        sock(VETH_IP, 80),
        sock(VPEER, 40010),
        tcp_flags::SYN | tcp_flags::ACK,
    ));
    let out = run(&dp, Program::SlotIngress, &synack.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out,
        &synack
            .with_dst(GUEST, 40010)
            .macs(TAP_MAC, GUEST_MAC)
            .build(),
    );
    assert_eq!(flow().state, STATE_SYN | STATE_REPLIED);
    passes(
        &dp,
        &to_vpeer(PacketBuilder::tcp(
            sock(VETH_IP, 81),
            sock(VPEER, 40010),
            tcp_flags::ACK,
        ))
        .build(),
    );

    // "Port unreachable" from the host about the guest's datagram, and about
    // a datagram of the slot namespace's.
    let sent = PacketBuilder::tcp(sock(VPEER, 40010), sock(VETH_IP, 80), tcp_flags::SYN);
    let quoted = quote(&sent.ipv4_bytes());
    let err = to_vpeer(PacketBuilder::icmp(VETH_IP, VPEER, 3, 3).payload(&quoted));
    let out = run(&dp, Program::SlotIngress, &err.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &out,
        &PacketBuilder::icmp(VETH_IP, GUEST, 3, 3)
            .payload(&requote_src(&quoted, GUEST, 40010))
            .macs(TAP_MAC, GUEST_MAC)
            .build(),
    );
    let other = quote(&PacketBuilder::udp(sock(VPEER, 5000), sock(VETH_IP, 53), b"q").ipv4_bytes());
    passes(
        &dp,
        &to_vpeer(PacketBuilder::icmp(VETH_IP, VPEER, 3, 3).payload(&other)).build(),
    );
    assert_eq!(stats(&dp).counters[Counter::TO_GUEST_PACKETS], 2);
}

#[test]
fn slot_dnat_of_host_ip_tracks_the_flow() {
    let Some(dp) = datapath() else { return };
    let syn = PacketBuilder::tcp(sock(VETH_IP, 50000), sock(HOST_IP, 8080), tcp_flags::SYN)
        .macs(VETH_MAC, ETH0_MAC);
    let out = run(&dp, Program::SlotIngress, &syn.build());
    assert_eq!(out.verdict, TC_ACT_REDIRECT);
    assert_frame(&out, &syn.with_dst(GUEST, 8080).build());
    let flow = dp
        .maps()
        .flow(
            FlowTable::HostFlows,
            &key(VETH_IP, 50000, HOST_IP, 8080, IPPROTO_TCP),
        )
        .unwrap()
        .expect("HOST_FLOWS entry");
    assert_eq!(
        (flow.addr, flow.port, flow.slot, flow.state),
        (map_ip(GUEST), 8080u16.to_be(), SLOT, STATE_SYN)
    );
    // The same flow again refreshes instead of adding.
    let ack = PacketBuilder::tcp(sock(VETH_IP, 50000), sock(HOST_IP, 8080), tcp_flags::ACK)
        .macs(VETH_MAC, ETH0_MAC);
    assert_eq!(
        run(&dp, Program::SlotIngress, &ack.build()).verdict,
        TC_ACT_REDIRECT
    );
    assert_eq!(dp.table_usage().unwrap().host_flows, 1);
    assert_eq!(stats(&dp).counters[Counter::TO_GUEST_PACKETS], 2);
}

#[test]
fn slot_passes_other_traffic_untouched() {
    let Some(dp) = datapath() else { return };
    let frames = [
        PacketBuilder::tcp(
            sock(WAN, 80),
            sock(Ipv4Addr::new(10, 12, 0, 99), 1),
            tcp_flags::ACK,
        )
        .build(),
        arp_request(VETH_MAC, VETH_IP, VPEER),
        ipv6_udp_frame(VETH_MAC, ETH0_MAC),
    ];
    for frame in frames {
        let out = run(&dp, Program::SlotIngress, &frame);
        assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    }
}

/// A reply `uplink_ingress` translated and marked goes on to the TAP as it is,
/// counted for the mark's slot, with the mark cleared; one marked for a slot
/// that is gone is dropped; the same frame unmarked is not the datapath's.
#[test]
fn slot_passes_marked_replies_on_untouched() {
    let Some(dp) = datapath() else { return };
    let frame = PacketBuilder::tcp(sock(WAN, 443), sock(GUEST, 33333), tcp_flags::ACK)
        .macs(TAP_MAC, GUEST_MAC)
        .payload(b"for the guest")
        .build();
    let out = dp
        .test_run_marked(Program::SlotIngress, &frame, TO_GUEST_MARK | SLOT)
        .unwrap();
    assert_eq!(
        (out.verdict, &out.frame, out.mark),
        (TC_ACT_REDIRECT, &frame, 0)
    );
    assert_eq!(
        (
            stats(&dp).counters[Counter::TO_GUEST_PACKETS],
            stats(&dp).counters[Counter::TO_GUEST_BYTES]
        ),
        (1, frame.len() as u64)
    );

    let gone = dp
        .test_run_marked(Program::SlotIngress, &frame, TO_GUEST_MARK | (SLOT + 1))
        .unwrap();
    assert_eq!((gone.verdict, gone.mark), (TC_ACT_SHOT, 0));

    let unmarked = run(&dp, Program::SlotIngress, &frame);
    assert_eq!((unmarked.verdict, &unmarked.frame), (TC_ACT_OK, &frame));
    assert_eq!(stats(&dp).counters[Counter::TO_GUEST_PACKETS], 1);
}

#[test]
fn slot_drops_malformed_and_fragments_for_the_guest() {
    let Some(dp) = datapath() else { return };
    let good = PacketBuilder::udp(sock(WAN, 1), sock(VPEER, 2), b"abc").build();
    let mut bad = good.clone();
    bad[14] = 0x43;
    assert_eq!(run(&dp, Program::SlotIngress, &bad).verdict, TC_ACT_SHOT);
    let frag = PacketBuilder::udp(sock(WAN, 1), sock(HOST_IP, 2), &[0; 16])
        .fragment(true, 0)
        .build();
    assert_eq!(run(&dp, Program::SlotIngress, &frag).verdict, TC_ACT_SHOT);
    assert_eq!(drops(&dp, DropReason::Malformed), 1);
    assert_eq!(drops(&dp, DropReason::Fragment), 1);
}

// ---------------------------------------------------------------- whole paths

#[test]
fn guest_to_world_and_back_through_all_four_programs() {
    let Some(dp) = datapath() else { return };
    // Guest → world: tap_ingress, then veth_ingress on the host side.
    let syn = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 33333),
        sock(WAN, 443),
        tcp_flags::SYN,
    ));
    let on_wire = from_tap(&dp, &syn.build());
    assert_eq!(on_wire.verdict, TC_ACT_REDIRECT);
    verify_checksums(&on_wire.frame).unwrap();
    let wire = packet::parse(&on_wire.frame).unwrap();
    assert_eq!(wire.src, UPLINK_IP);
    assert_eq!(wire.dst_sock(), sock(WAN, 443));

    // World → guest: uplink_ingress, then slot_ingress in the slot namespace.
    let reply = PacketBuilder::tcp(
        sock(WAN, 443),
        wire.src_sock(),
        tcp_flags::SYN | tcp_flags::ACK,
    )
    .macs(WAN_MAC, UPLINK_MAC);
    let at_eth0 = run(&dp, Program::UplinkIngress, &reply.build());
    assert_eq!(at_eth0.verdict, TC_ACT_REDIRECT);
    // The guest's SYN taught veth_ingress the guest's MACs, so the reply is
    // translated for the guest in one go, addressed to it from the TAP's MAC,
    // and marked for the slot: slot_ingress only passes it on to the TAP.
    let for_guest = reply
        .macs(TAP_MAC, GUEST_MAC)
        .with_dst(GUEST, 33333)
        .build();
    assert_frame(&at_eth0, &for_guest);
    assert_eq!(at_eth0.mark, TO_GUEST_MARK | SLOT);
    let to_guest = dp
        .test_run_marked(Program::SlotIngress, &at_eth0.frame, at_eth0.mark)
        .unwrap();
    assert_eq!(to_guest.verdict, TC_ACT_REDIRECT);
    assert_frame(&to_guest, &for_guest);
    assert_eq!(to_guest.mark, 0, "the mark stays on the host side");
    let s = stats(&dp);
    assert_eq!(
        (
            s.counters[Counter::FROM_GUEST_PACKETS],
            s.counters[Counter::TO_GUEST_PACKETS]
        ),
        (1, 1)
    );
}

/// On maps reused from a previous run, an older `slot_ingress` may still be on a
/// slot's eth0 until the slot is adopted: until the agent says every slot has
/// this build's programs (`CONFIG_F_TO_GUEST_MARK`), replies go to the vpeer
/// address unmarked, as an older `slot_ingress` expects, even with the guest's
/// MACs known; then they are translated for the guest on the uplink.
#[test]
fn replies_go_to_the_vpeer_address_until_every_slot_knows_the_mark() {
    let Some(mut dp) = datapath() else { return };
    let syn = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 33334),
        sock(WAN, 443),
        tcp_flags::SYN,
    ));
    let wire = packet::parse(&from_tap(&dp, &syn.build()).frame).unwrap();
    let reply = PacketBuilder::tcp(sock(WAN, 443), wire.src_sock(), tcp_flags::ACK)
        .macs(WAN_MAC, UPLINK_MAC)
        .payload(b"reply");

    dp.set_to_guest_mark(false).unwrap();
    let at_eth0 = run(&dp, Program::UplinkIngress, &reply.build());
    assert_eq!(at_eth0.verdict, TC_ACT_REDIRECT);
    assert_frame(
        &at_eth0,
        &reply
            .clone()
            .macs(VETH_MAC, ETH0_MAC)
            .with_dst(VPEER, 33334)
            .build(),
    );
    assert_eq!(at_eth0.mark, 0);
    let for_guest = reply
        .clone()
        .macs(TAP_MAC, GUEST_MAC)
        .with_dst(GUEST, 33334)
        .build();
    let to_guest = run(&dp, Program::SlotIngress, &at_eth0.frame);
    assert_eq!(to_guest.verdict, TC_ACT_REDIRECT);
    assert_frame(&to_guest, &for_guest);

    dp.set_to_guest_mark(true).unwrap();
    let at_eth0 = run(&dp, Program::UplinkIngress, &reply.build());
    assert_frame(&at_eth0, &for_guest);
    assert_eq!(at_eth0.mark, TO_GUEST_MARK | SLOT);
}

#[test]
fn host_to_guest_and_back_through_slot_and_tap() {
    let Some(dp) = datapath() else { return };
    let req =
        PacketBuilder::udp(sock(VETH_IP, 41000), sock(HOST_IP, 53), b"q").macs(VETH_MAC, ETH0_MAC);
    let at_tap = run(&dp, Program::SlotIngress, &req.build());
    assert_eq!(at_tap.verdict, TC_ACT_REDIRECT);
    assert_eq!(packet::parse(&at_tap.frame).unwrap().dst, GUEST);
    let answer = guest_frame(PacketBuilder::udp(
        sock(GUEST, 53),
        sock(VETH_IP, 41000),
        b"a",
    ));
    // The reply goes up the host stack as HostIP.
    let out = from_tap(&dp, &answer.build());
    assert_eq!(out.verdict, TC_ACT_OK);
    assert_frame(
        &out,
        &answer
            .macs(ETH0_MAC, VETH_MAC)
            .with_src(HOST_IP, 53)
            .build(),
    );
}

// ---------------------------------------------------------------- userspace side

#[test]
fn reap_expires_flows_by_protocol_and_state() {
    let Some(mut dp) = datapath() else { return };
    let tcp = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 1000),
        sock(WAN, 80),
        tcp_flags::SYN,
    ));
    let (_, tport) = masquerade(&dp, &tcp);
    let udp = from_vpeer(PacketBuilder::udp(sock(VPEER, 1001), sock(WAN, 53), b"q"));
    masquerade(&dp, &udp);
    let host = PacketBuilder::tcp(sock(VETH_IP, 50001), sock(HOST_IP, 22), tcp_flags::SYN);
    run(&dp, Program::SlotIngress, &host.build());
    let now = netagent_now();
    let t = Timeouts {
        tcp_established: 1000,
        tcp_opening: 60,
        tcp_closing: 10,
        udp: 30,
        icmp: 30,
        reap_interval: 5,
    };
    let sec = 1_000_000_000u64;
    assert_eq!(
        dp.reap_at(&t, now + 5 * sec).unwrap().total(),
        0,
        "nothing idle yet"
    );
    // After 40 s: UDP (30 s) gone, opening TCP (60 s) and the host flow stay.
    let r = dp.reap_at(&t, now + 40 * sec).unwrap();
    assert_eq!((r.nat_flows, r.host_flows), (1, 0));
    // The TCP flow gets a reply: established now, so 70 s is not enough.
    let reply = PacketBuilder::tcp(sock(WAN, 80), sock(UPLINK_IP, tport), tcp_flags::ACK);
    run(&dp, Program::UplinkIngress, &reply.build());
    let r = dp.reap_at(&t, now + 70 * sec).unwrap();
    assert_eq!(
        (r.nat_flows, r.host_flows),
        (0, 1),
        "opening host flow expired"
    );
    let r = dp.reap_at(&t, now + 2000 * sec).unwrap();
    assert_eq!(r.nat_flows, 1);
    let usage = dp.table_usage().unwrap();
    assert_eq!(
        (usage.nat_egress, usage.nat_ingress, usage.host_flows),
        (0, 0, 0)
    );
}

#[test]
fn reap_uses_the_closing_timeout_after_fins() {
    let Some(mut dp) = datapath() else { return };
    let fin = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 1000),
        sock(WAN, 80),
        tcp_flags::FIN | tcp_flags::ACK,
    ));
    let (_, port) = masquerade(&dp, &fin);
    let fin_back = PacketBuilder::tcp(
        sock(WAN, 80),
        sock(UPLINK_IP, port),
        tcp_flags::FIN | tcp_flags::ACK,
    );
    run(&dp, Program::UplinkIngress, &fin_back.build());
    let ingress = dp
        .maps()
        .flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, port, IPPROTO_TCP),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        ingress.state,
        STATE_REPLIED | STATE_FIN_REPLY | STATE_SLOT_NS
    );
    let t = Timeouts::default(); // closing: 10 s
    let r = dp.reap_at(&t, netagent_now() + 11_000_000_000).unwrap();
    assert_eq!(r.nat_flows, 1);
}

#[test]
fn detach_slot_removes_its_flows_and_counters_only() {
    let Some(mut dp) = datapath() else { return };
    let pkt = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 1),
        sock(WAN, 80),
        tcp_flags::SYN,
    ));
    masquerade(&dp, &pkt);
    run(
        &dp,
        Program::SlotIngress,
        &PacketBuilder::tcp(sock(VETH_IP, 2), sock(HOST_IP, 22), tcp_flags::SYN).build(),
    );
    // A flow of another slot must survive.
    let other = key(Ipv4Addr::new(10, 12, 0, 17), 5, WAN, 80, IPPROTO_TCP);
    dp.maps_mut()
        .insert_flow(
            FlowTable::NatEgress,
            &other,
            &NatEntry {
                slot: 8,
                ..NatEntry::default()
            },
        )
        .unwrap();
    assert_ne!(stats(&dp), SlotStats::default());
    dp.detach_slot(SLOT).unwrap();
    let usage = dp.table_usage().unwrap();
    assert_eq!(
        (usage.nat_egress, usage.nat_ingress, usage.host_flows),
        (1, 0, 0)
    );
    assert!(
        dp.maps()
            .flow(FlowTable::NatEgress, &other)
            .unwrap()
            .is_some()
    );
    assert_eq!(stats(&dp), SlotStats::default());
    assert_eq!(dp.maps().slot(SLOT).unwrap(), SlotInfo::default());
    assert!(dp.maps().addr_slots().unwrap().is_empty());
    assert!(dp.maps().veth_slots().unwrap().is_empty());
    // Nothing of slot 7 translates any more, in either direction.
    let frame = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 1),
        sock(WAN, 2),
        tcp_flags::SYN,
    ))
    .build();
    assert_eq!(
        tap(&dp, &frame).verdict,
        TC_ACT_SHOT,
        "its TAP is no slot's"
    );
    let out = run(&dp, Program::VethIngress, &frame);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &frame));
    let to_guest = PacketBuilder::udp(sock(WAN, 1), sock(VPEER, 2), b"x").build();
    let out = run(&dp, Program::SlotIngress, &to_guest);
    assert_eq!((out.verdict, &out.frame), (TC_ACT_OK, &to_guest));
    // Idempotent.
    dp.detach_slot(SLOT).unwrap();
}

#[test]
fn slot_index_out_of_range_is_an_error() {
    let Some(mut dp) = datapath() else { return };
    assert!(dp.detach_slot(0).is_err());
    assert!(dp.detach_slot(64).is_err());
    assert!(dp.slot_stats(1000).is_err());
}

/// Now on `CLOCK_MONOTONIC`, the clock of the flows' `last_seen_ns` (the
/// datapath's coarse reading of it lags by at most a tick).
fn netagent_now() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

#[test]
fn program_cost_per_packet() {
    let Some(dp) = datapath() else { return };
    let syn = from_vpeer(PacketBuilder::tcp(
        sock(VPEER, 40100),
        sock(WAN, 80),
        tcp_flags::ACK,
    ));
    let (_, port) = masquerade(&dp, &syn);
    let guest_tcp = guest_frame(PacketBuilder::tcp(
        sock(GUEST, 1),
        sock(WAN, 80),
        tcp_flags::ACK,
    ));
    let (_, guest_port) = guest_masquerade(&dp, &guest_tcp);
    let cases: [(&str, Program, Vec<u8>); 8] = [
        (
            "tap: guest TCP to the world",
            Program::TapIngress,
            guest_tcp.build(),
        ),
        (
            "veth: guest masquerade, known flow",
            Program::VethIngress,
            guest_tcp.build(),
        ),
        (
            "veth: masquerade, known flow",
            Program::VethIngress,
            syn.build(),
        ),
        (
            "uplink: reply of a guest flow (translated, marked)",
            Program::UplinkIngress,
            PacketBuilder::tcp(sock(WAN, 80), sock(UPLINK_IP, guest_port), tcp_flags::ACK).build(),
        ),
        (
            "uplink: reply of a slot namespace's flow",
            Program::UplinkIngress,
            PacketBuilder::tcp(sock(WAN, 80), sock(UPLINK_IP, port), tcp_flags::ACK).build(),
        ),
        (
            "uplink: host traffic (pass)",
            Program::UplinkIngress,
            PacketBuilder::tcp(sock(WAN, 80), sock(UPLINK_IP, 45000), tcp_flags::ACK).build(),
        ),
        (
            "slot: to vpeer, the slot namespace's (pass)",
            Program::SlotIngress,
            PacketBuilder::tcp(sock(WAN, 80), sock(VPEER, 40100), tcp_flags::ACK).build(),
        ),
        (
            "slot: to HostIP (tracked)",
            Program::SlotIngress,
            PacketBuilder::tcp(sock(VETH_IP, 9), sock(HOST_IP, 22), tcp_flags::ACK).build(),
        ),
    ];
    // One kernel run per call: with `repeat` the kernel reruns the program on the
    // skb it already rewrote, which would measure the pass-through path
    // (tap_ingress rewrites nothing: there `repeat` measures the same path).
    const RUNS: u32 = 20_000;
    let measure = |dp: &Dp, what: &str, prog: Program, frame: &[u8]| {
        let (out, per_run) = if prog == Program::TapIngress {
            tap_repeat(dp, frame, RUNS)
        } else {
            let mut total = std::time::Duration::ZERO;
            let mut out = None;
            for _ in 0..RUNS {
                let (o, d) = dp.test_run_repeat(prog, frame, 1).unwrap();
                total += d;
                out = Some(o);
            }
            (out.unwrap(), total / RUNS)
        };
        assert_eq!(
            out.verdict,
            if what.contains("pass") {
                TC_ACT_OK
            } else {
                TC_ACT_REDIRECT
            },
            "{what}"
        );
        eprintln!(
            "{what:48} {:>6} ns/packet (verdict {})",
            per_run.as_nanos(),
            out.verdict
        );
        assert!(
            per_run.as_nanos() < 5_000,
            "{what}: {per_run:?} per packet is far beyond a TC program's budget"
        );
    };
    for (what, prog, frame) in cases {
        measure(&dp, what, prog, &frame);
    }
    // With the security settings in place: the default deny list, rules of the
    // slot's own (the destination matches none: both lookups miss) and a
    // bandwidth limit the traffic stays under.
    let mut dp = dp;
    dp.set_default_egress(&netagent::bpf::DEFAULT_EGRESS_DENY)
        .unwrap();
    let rules = netagent::bpf::EgressRules {
        allow: (0..16u32)
            .map(|i| netagent::bpf::Cidr::new(Ipv4Addr::from(0x0808_0000 + (i << 8)), 24).unwrap())
            .collect(),
        deny: vec!["203.0.113.0/24".parse().unwrap()],
    };
    dp.set_slot_egress(SLOT, &rules).unwrap();
    dp.set_rate_limit(
        SLOT,
        Some(netagent::bpf::RateLimit {
            rate_bytes_per_sec: u64::MAX / 2,
            burst_bytes: 1 << 30,
        }),
    )
    .unwrap();
    let guest_tcp = guest_tcp.build();
    measure(
        &dp,
        "tap: guest TCP, rate limit set",
        Program::TapIngress,
        &guest_tcp,
    );
    measure(
        &dp,
        "veth: guest masquerade, known flow, egress rules",
        Program::VethIngress,
        &guest_tcp,
    );
}

// ---------------------------------------------------------------- real attach

/// Throwaway namespaces (deleted on drop, also on test failure).
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
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

/// (ifindex, MAC) of `dev` in namespace `ns`.
fn link_info(ns: &str, dev: &str) -> (u32, [u8; 6]) {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", "dev", dev])
        .output()
        .expect("run ip");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
    let ifindex = v[0]["ifindex"].as_u64().expect("ifindex") as u32;
    let mac: Vec<u8> = v[0]["address"]
        .as_str()
        .expect("address")
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    (ifindex, mac.try_into().unwrap())
}

fn netns_file(ns: &str) -> std::fs::File {
    std::fs::File::open(format!("/run/netns/{ns}")).expect("open netns")
}

/// Runs `f` inside namespace `ns` (on a helper thread).
fn inside<R: Send>(ns: &std::fs::File, f: impl FnOnce() -> R + Send) -> R {
    use std::os::fd::AsFd;
    netagent::bpf::in_netns(ns.as_fd(), || Ok(f())).unwrap()
}

fn udp_socket(ns: &std::fs::File, addr: SocketAddrV4) -> std::net::UdpSocket {
    inside(ns, || {
        let s = std::net::UdpSocket::bind(addr).expect("bind UDP");
        s.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        s
    })
}

fn recv(s: &std::net::UdpSocket) -> Option<(Vec<u8>, std::net::SocketAddr)> {
    let mut buf = [0u8; 1500];
    s.recv_from(&mut buf)
        .ok()
        .map(|(n, from)| (buf[..n].to_vec(), from))
}

/// A real topology with the datapath attached: a "guest" namespace behind
/// `tap0` (a veth standing in for the TAP), the slot namespace, the agent
/// ("host") namespace and a "wan" namespace behind the uplink. `ip_forward`
/// stays 0 everywhere. Everything is removed on drop.
struct RealWorld {
    dp: Datapath,
    host_ns: std::fs::File,
    wan_ns: std::fs::File,
    guest_ns: std::fs::File,
    names: [String; 4],
    // Declared last: the namespaces go after the datapath is dropped.
    _namespaces: Namespaces,
}

impl RealWorld {
    fn new(tag: char) -> Option<RealWorld> {
        Self::with_mode(tag, AttachMode::Auto)
    }

    fn with_mode(tag: char, mode: AttachMode) -> Option<RealWorld> {
        Self::build(tag, mode, false)
    }

    /// `veth_peer`: the datapath is told the uplink is a veth with its peer in
    /// another namespace (which `up0` is), as the agent finds out itself.
    fn build(tag: char, mode: AttachMode, veth_peer: bool) -> Option<RealWorld> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: needs root (CAP_NET_ADMIN, CAP_BPF)");
            return None;
        }
        let p = format!("d{tag}{:03x}", std::process::id() & 0xfff);
        let names = [
            format!("{p}-host"),
            format!("{p}-wan"),
            format!("{p}-slot"),
            format!("{p}-guest"),
        ];
        let guard = Namespaces(names.to_vec());
        let [h, w, s, g] = &names;
        for ns in &names {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            // No IPv6 on the links to come: their router solicitations and MLD
            // reports would land in the uplink's packet counts the tests read.
            inside(&netns_file(ns), || {
                for conf in ["all", "default"] {
                    let _ =
                        std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
                }
            });
        }
        let veth = format!("{p}-veth-7");
        ip(&[
            "-n", h, "link", "add", "up0", "type", "veth", "peer", "name", "wan0", "netns", w,
        ]);
        ip(&["-n", h, "addr", "add", "198.18.0.1/24", "dev", "up0"]);
        ip(&["-n", h, "link", "set", "up0", "up"]);
        ip(&["-n", w, "addr", "add", "198.18.0.100/24", "dev", "wan0"]);
        ip(&["-n", w, "link", "set", "wan0", "up"]);
        // eth0 gets SLOT_ETH0_IFINDEX, as slot create makes it (the peer's index
        // is honoured when the main device's is given too).
        let eth0_index = SLOT_ETH0_IFINDEX.to_string();
        ip(&[
            "-n",
            h,
            "link",
            "add",
            &veth,
            "index",
            "4097",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "index",
            &eth0_index,
            "netns",
            s,
        ]);
        ip(&["-n", h, "addr", "add", "10.12.0.14/31", "dev", &veth]);
        ip(&["-n", h, "link", "set", &veth, "up"]);
        ip(&["-n", s, "addr", "add", "10.12.0.15/31", "dev", "eth0"]);
        ip(&["-n", s, "link", "set", "eth0", "up"]);
        // tap0 has slot 7's TAP ifindex, as slot create makes it.
        let tap_index = TAP_IFINDEX.to_string();
        ip(&[
            "-n", s, "link", "add", "tap0", "index", &tap_index, "type", "veth", "peer", "name",
            "eth0", "netns", g,
        ]);
        ip(&["-n", s, "addr", "add", "169.254.0.22/30", "dev", "tap0"]);
        ip(&["-n", s, "link", "set", "tap0", "up"]);
        ip(&["-n", g, "addr", "add", "169.254.0.21/30", "dev", "eth0"]);
        ip(&["-n", g, "link", "set", "eth0", "up"]);
        ip(&["-n", g, "route", "add", "default", "via", "169.254.0.22"]);
        ip(&["-n", s, "route", "add", "default", "via", "10.12.0.14"]);
        ip(&["-n", h, "route", "add", "10.11.0.7/32", "via", "10.12.0.15"]);

        let (host_ns, wan_ns, slot_ns, guest_ns) =
            (netns_file(h), netns_file(w), netns_file(s), netns_file(g));
        for ns in [&host_ns, &slot_ns] {
            let fwd = inside(ns, || {
                std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            });
            assert_eq!(fwd.unwrap().trim(), "0", "no ip_forward needed");
        }
        let (up_idx, _) = link_info(h, "up0");
        let (veth_idx, veth_mac) = link_info(h, &veth);
        let (eth0_idx, eth0_mac) = link_info(s, "eth0");
        assert_eq!(eth0_idx, SLOT_ETH0_IFINDEX);
        let (tap_idx, _) = link_info(s, "tap0");
        assert_eq!(tap_idx, TAP_IFINDEX);

        let dp = inside(&host_ns, || {
            let mut cfg = small_config();
            cfg.attach_mode = mode;
            let mut dp = Datapath::load(&cfg).expect("load");
            dp.attach_uplink(&netagent::bpf::Uplink {
                ifindex: up_idx,
                name: "up0".into(),
                ipv4: UPLINK_IP,
                veth_peer,
            })
            .expect("attach uplink");
            dp.set_local_addrs(&[UPLINK_IP, VETH_IP]).unwrap();
            {
                use std::os::fd::AsFd;
                dp.attach_slot(&netagent::bpf::SlotDatapath {
                    index: SLOT,
                    netns: slot_ns.as_fd(),
                    veth_ifindex: veth_idx,
                    veth_mac,
                    eth0_ifindex: eth0_idx,
                    eth0_mac,
                    tap_ifindex: tap_idx,
                    tap_is_veth: false,
                    vpeer_ip: VPEER,
                    host_ip: HOST_IP,
                })
                .expect("attach slot");
            }
            dp
        });
        Some(RealWorld {
            dp,
            host_ns,
            wan_ns,
            guest_ns,
            names,
            _namespaces: guard,
        })
    }
}

/// The whole path on real links (see `RealWorld`), checksum offload on.
#[test]
fn attached_slot_carries_real_udp_and_tcp_both_ways() {
    let Some(world) = RealWorld::new('a') else {
        return;
    };
    let RealWorld {
        mut dp,
        host_ns,
        wan_ns,
        guest_ns,
        ..
    } = world;
    assert_eq!(dp.attached_slots(), vec![SLOT]);

    // Guest → wan over UDP: the wan sees the uplink address and a range port.
    let server = udp_socket(&wan_ns, sock(WAN, 7000));
    let client = udp_socket(&guest_ns, sock(GUEST, 0));
    client.send_to(b"ping", sock(WAN, 7000)).unwrap();
    let got = recv(&server);
    if got.is_none() {
        // Diagnostics for a failure: where did the datagram stop?
        eprintln!("slot stats: {:?}", dp.slot_stats(SLOT));
        eprintln!("unattributed: {:?}", dp.unattributed_stats());
        eprintln!("NAT_EGRESS: {:?}", dp.maps().flows(FlowTable::NatEgress));
    }
    let (data, from) = got.expect("the wan server got the guest's datagram");
    assert_eq!(data, b"ping");
    let std::net::SocketAddr::V4(from) = from else {
        panic!("v6 peer")
    };
    assert_eq!(*from.ip(), UPLINK_IP, "masqueraded to the uplink address");
    assert!((PORT_MIN..=PORT_MAX).contains(&from.port()));
    server.send_to(b"pong", from).unwrap();
    let (data, from) = recv(&client).expect("the guest got the reply");
    assert_eq!(
        (data.as_slice(), from),
        (&b"pong"[..], sock(WAN, 7000).into())
    );

    // Host → guest at HostIP: the guest's reply comes back from HostIP.
    let guest_srv = udp_socket(&guest_ns, sock(Ipv4Addr::UNSPECIFIED, 7001));
    let host_cli = udp_socket(&host_ns, sock(Ipv4Addr::UNSPECIFIED, 0));
    host_cli
        .send_to(b"hello guest", sock(HOST_IP, 7001))
        .unwrap();
    let (data, from) = recv(&guest_srv).expect("the guest got the host's datagram");
    assert_eq!(data, b"hello guest");
    guest_srv.send_to(b"hello host", from).unwrap();
    let (data, from) = recv(&host_cli).expect("the host got the guest's reply");
    assert_eq!(
        (data.as_slice(), from),
        (&b"hello host"[..], sock(HOST_IP, 7001).into())
    );

    let st = dp.slot_stats(SLOT).unwrap();
    assert_eq!(
        (
            st.counters[Counter::FROM_GUEST_PACKETS],
            st.counters[Counter::TO_GUEST_PACKETS]
        ),
        (2, 2),
        "exactly the datagrams sent each way"
    );
    assert_eq!(st.counters[Counter::NAT_ALLOCATIONS], 1);
    let usage = dp.table_usage().unwrap();
    assert_eq!(
        (usage.nat_egress, usage.nat_ingress, usage.host_flows),
        (1, 1, 1)
    );

    // TCP guest → wan, with data both ways.
    let listener = inside(&wan_ns, || {
        std::net::TcpListener::bind(sock(WAN, 7002)).unwrap()
    });
    let stream = inside(&guest_ns, || {
        std::net::TcpStream::connect_timeout(
            &sock(WAN, 7002).into(),
            std::time::Duration::from_secs(3),
        )
    })
    .expect("TCP connect through the datapath");
    let (mut accepted, peer) = listener.accept().unwrap();
    let std::net::SocketAddr::V4(peer) = peer else {
        panic!("v6 peer")
    };
    assert_eq!(*peer.ip(), UPLINK_IP);
    {
        use std::io::{Read, Write};
        let mut stream = stream;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let big = vec![0x5a; 256 * 1024];
        stream.write_all(&big).unwrap();
        let mut got = vec![0; big.len()];
        accepted.read_exact(&mut got).unwrap();
        assert_eq!(got, big);
        accepted.write_all(b"bye").unwrap();
        let mut bye = [0; 3];
        stream.read_exact(&mut bye).unwrap();
        assert_eq!(&bye, b"bye");
    }

    // Detached: the guest's packets no longer leave the slot.
    dp.detach_slot(SLOT).unwrap();
    assert!(dp.attached_slots().is_empty());
    let usage = dp.table_usage().unwrap();
    assert_eq!(
        (usage.nat_egress, usage.nat_ingress, usage.host_flows),
        (0, 0, 0)
    );
    server
        .set_read_timeout(Some(std::time::Duration::from_millis(500)))
        .unwrap();
    client.send_to(b"after", sock(WAN, 7000)).unwrap();
    assert!(recv(&server).is_none(), "no traffic after detach");
    dp.detach_uplink().unwrap();
}

/// `up0`'s transmit and the wan end's receive packet counters.
fn uplink_packets(world: &RealWorld) -> (u64, u64) {
    let count = |ns: &str, dev: &str, dir: &str| {
        let out = std::process::Command::new("ip")
            .args(["-n", ns, "-s", "-j", "link", "show", "dev", dev])
            .output()
            .expect("run ip");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        v[0]["stats64"][dir]["packets"].as_u64().expect("packets")
    };
    (
        count(&world.names[0], "up0", "tx"),
        count(&world.names[1], "wan0", "rx"),
    )
}

/// Forwarding on on the uplink `up0` only (`bpf_fib_lookup` requires it; the
/// namespace's `ip_forward` stays 0), as on a host that forwards.
fn uplink_forwarding_on(world: &RealWorld) {
    ip(&[
        "netns",
        "exec",
        &world.names[0],
        "sysctl",
        "-qw",
        "net.ipv4.conf.up0.forwarding=1",
    ]);
}

/// A raw socket on the wan end of the uplink: the frames as they arrive.
fn wan_capture(world: &RealWorld) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let (wan_idx, _) = link_info(&world.names[1], "wan0");
    inside(&world.wan_ns, || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2); the descriptor is owned right below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            raw >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = wan_idx as i32;
        // SAFETY: `sll` is a valid sockaddr_ll of the length given.
        let rc = unsafe {
            libc::bind(
                raw,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        fd
    })
}

/// Discards the frames captured so far (a full socket would drop new ones).
fn drain(fd: &std::os::fd::OwnedFd) {
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 2048];
    // SAFETY: `buf` is writable for its length.
    while unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    } >= 0
    {}
}

/// The first captured frame that is an IPv4 UDP datagram to `port`.
fn captured_udp_to(fd: &std::os::fd::OwnedFd, port: u16) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut buf = vec![0u8; 2048];
    while std::time::Instant::now() < deadline {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
            continue;
        }
        let f = &buf[..n as usize];
        if f.len() >= 42
            && f[12..14] == [0x08, 0x00]
            && f[23] == 17
            && f[36..38] == port.to_be_bytes()
        {
            return Some(f.to_vec());
        }
    }
    None
}

/// With the uplink a veth whose peer is in another namespace, masqueraded
/// packets go straight to the peer's ingress with the next hop's MACs when the
/// kernel's FIB and neighbour table have the next hop (forwarding on the uplink,
/// which `bpf_fib_lookup` requires), and through the uplink's transmit path
/// (`bpf_redirect_neigh`) otherwise. Both deliver the same bytes.
#[test]
fn veth_uplink_hands_masqueraded_frames_to_the_peer_with_the_next_hops_macs() {
    let Some(world) = RealWorld::build('p', AttachMode::Auto, true) else {
        return;
    };
    let (_, up_mac) = link_info(&world.names[0], "up0");
    let (_, wan_mac) = link_info(&world.names[1], "wan0");
    let server = udp_socket(&world.wan_ns, sock(WAN, 7100));
    let client = udp_socket(&world.guest_ns, sock(GUEST, 0));
    let capture = wan_capture(&world);
    let send = |payload: &[u8]| {
        drain(&capture);
        client.send_to(payload, sock(WAN, 7100)).unwrap();
        let (data, from) = recv(&server).expect("the wan server got the datagram");
        assert_eq!(data, payload);
        let frame = captured_udp_to(&capture, 7100).expect("the frame on wan0");
        assert_eq!(&frame[0..6], &wan_mac, "destination MAC: the next hop's");
        assert_eq!(&frame[6..12], &up_mac, "source MAC: the uplink's");
        from
    };

    // Forwarding off on the uplink: bpf_fib_lookup refuses, the uplink transmits
    // (and resolves the neighbour).
    let (tx0, rx0) = uplink_packets(&world);
    let from = send(b"by the neighbour path");
    let (tx1, rx1) = uplink_packets(&world);
    // (with the ARP request that resolves the neighbour)
    assert!(
        tx1 - tx0 >= 1 && tx1 - tx0 == rx1 - rx0,
        "transmitted by up0: tx +{}, rx +{}",
        tx1 - tx0,
        rx1 - rx0
    );

    // Forwarding on: the next hop (resolved above) comes from the FIB, and the
    // frame skips up0's transmit.
    uplink_forwarding_on(&world);
    let (tx0, rx0) = uplink_packets(&world);
    assert_eq!(
        send(b"straight to the peer"),
        from,
        "the same masquerade flow"
    );
    let (tx1, rx1) = uplink_packets(&world);
    assert_eq!(
        (tx1 - tx0, rx1 - rx0),
        (0, 1),
        "handed to wan0, not sent by up0"
    );

    // A TCP stream (GSO-sized packets) and its replies, on the peer path.
    let listener = inside(&world.wan_ns, || {
        std::net::TcpListener::bind(sock(WAN, 7102)).unwrap()
    });
    let stream = inside(&world.guest_ns, || {
        std::net::TcpStream::connect_timeout(
            &sock(WAN, 7102).into(),
            std::time::Duration::from_secs(3),
        )
    })
    .expect("TCP connect through the datapath");
    let (mut accepted, peer) = listener.accept().unwrap();
    assert_eq!(peer.ip(), std::net::IpAddr::V4(UPLINK_IP));
    accepted
        .set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    {
        use std::io::{Read, Write};
        let mut stream = stream;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        // What the socket buffers hold: the reading starts after the writing.
        let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
        stream.write_all(&big).unwrap();
        let mut got = vec![0; big.len()];
        accepted.read_exact(&mut got).unwrap();
        assert!(got == big, "the stream arrived intact");
        accepted.write_all(b"bye").unwrap();
        let mut bye = [0; 3];
        stream.read_exact(&mut bye).unwrap();
        assert_eq!(&bye, b"bye");
    }

    // The neighbour gone: once the cached next hop has expired, the FIB has no
    // MAC and the uplink resolves it again.
    ip(&["-n", &world.names[0], "neigh", "flush", "dev", "up0"]);
    std::thread::sleep(std::time::Duration::from_nanos(2 * NEXT_HOP_CACHE_NS));
    let (tx0, _) = uplink_packets(&world);
    send(b"neighbour flushed");
    let (tx1, _) = uplink_packets(&world);
    assert!(
        tx1 - tx0 >= 1,
        "transmitted by up0 while the neighbour resolves"
    );
}

/// `NEXT_HOPS`, opened through its pin (the datapath alone writes it; the test
/// below plants entries to see which the datapath uses).
fn next_hops(dp: &Datapath) -> aya::maps::PerCpuArray<aya::maps::MapData, NextHop> {
    let pin = dp.pin_dir().join(MAP_NEXT_HOPS);
    let data = aya::maps::MapData::from_pin(&pin).expect("open the NEXT_HOPS pin");
    aya::maps::PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).unwrap()
}

/// `CLOCK_MONOTONIC_COARSE`, the datapath's flow and cache clock, in ns.
fn coarse_now_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).unwrap();
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

/// On the veth uplink's peer path the next hop `bpf_fib_lookup` gives is kept
/// per CPU and destination and used, for packets no larger than the lookups let
/// through, until it expires; then the FIB is asked again.
#[test]
fn next_hops_are_reused_for_their_lifetime_and_size_then_looked_up_again() {
    let Some(world) = RealWorld::build('n', AttachMode::Auto, true) else {
        return;
    };
    uplink_forwarding_on(&world);
    let (_, up_mac) = link_info(&world.names[0], "up0");
    let (_, wan_mac) = link_info(&world.names[1], "wan0");
    let server = udp_socket(&world.wan_ns, sock(WAN, 7104));
    let client = udp_socket(&world.guest_ns, sock(GUEST, 0));
    let capture = wan_capture(&world);
    // The destination MAC the wan saw on a datagram of `len` bytes of payload.
    let send = |len: usize| -> [u8; 6] {
        drain(&capture);
        let payload = vec![0x5a; len];
        client.send_to(&payload, sock(WAN, 7104)).unwrap();
        let (data, _) = recv(&server).expect("the wan server got the datagram");
        assert_eq!(data, payload);
        let frame = captured_udp_to(&capture, 7104).expect("the frame on wan0");
        assert_eq!(&frame[6..12], &up_mac, "source MAC: the uplink's");
        frame[0..6].try_into().unwrap()
    };
    let index = next_hop_index(map_ip(WAN), 7104u16.to_be(), IPPROTO_UDP);
    let cache = next_hops(&world.dp);
    let nr_cpus = aya::util::nr_cpus().unwrap();
    let plant = |hop: NextHop| {
        let mut cache = next_hops(&world.dp);
        let values = aya::maps::PerCpuValues::try_from(vec![hop; nr_cpus]).unwrap();
        cache.set(index, values, 0).unwrap();
    };

    // The first datagram resolves the neighbour (the uplink's transmit path);
    // the next one's lookup succeeds and is remembered on its CPU.
    assert_eq!(send(10), wan_mac);
    let before = coarse_now_ns();
    assert_eq!(send(10), wan_mac);
    let remembered: Vec<NextHop> = cache
        .get(&index, 0)
        .unwrap()
        .iter()
        .copied()
        .filter(|h| h.expires_ns != 0)
        .collect();
    assert_eq!(remembered.len(), 1, "one CPU's entry: {remembered:?}");
    let hop = remembered[0];
    // The destination's entry, as the datapath writes it.
    let entry = NextHop {
        daddr: map_ip(WAN),
        saddr: map_ip(UPLINK_IP),
        expires_ns: hop.expires_ns,
        dmac: wan_mac,
        smac: up_mac,
        max_len: 20 + 8 + 10,
        max_gso: 0,
        dport: 7104u16.to_be(),
        proto: IPPROTO_UDP,
        _pad: [0; 5],
    };
    assert_eq!(hop, entry);
    assert!(
        hop.expires_ns > before && hop.expires_ns <= coarse_now_ns() + NEXT_HOP_CACHE_NS,
        "expires {} (looked up after {before})",
        hop.expires_ns
    );

    // A live entry answers for packets no larger than it allows: the planted
    // MAC goes on the wire (and the wan stack still takes the frame).
    let planted = [0x02, 0, 0, 0, 0x4e, 0x48];
    let live = NextHop {
        expires_ns: coarse_now_ns() + 60_000_000_000,
        dmac: planted,
        max_len: 20 + 8 + 100,
        ..entry
    };
    plant(live);
    assert_eq!(send(100), planted, "a live entry is used");
    // Larger than any lookup let through: the FIB again, whose answer replaces
    // the entry.
    assert_eq!(send(101), wan_mac, "a larger datagram is looked up");
    assert_eq!(send(10), wan_mac, "and the FIB's answer is kept");
    // Another destination's entry in the same place of the array is not used:
    // another address, port (routing rules may select by it) or protocol.
    for other in [
        NextHop {
            daddr: map_ip(Ipv4Addr::new(198, 18, 9, 9)),
            ..live
        },
        NextHop {
            dport: 7105u16.to_be(),
            ..live
        },
        NextHop {
            proto: IPPROTO_TCP,
            ..live
        },
    ] {
        plant(other);
        assert_eq!(send(10), wan_mac, "the entry of {other:?}");
    }
    // Expired: looked up again.
    plant(NextHop {
        expires_ns: coarse_now_ns().saturating_sub(1),
        ..live
    });
    assert_eq!(send(10), wan_mac, "an expired entry");
}

#[test]
fn maps_are_pinned_and_another_instances_pins_are_left_alone() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root (CAP_BPF, mount)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("netagent-pins-test-{}", std::process::id()));
    let mut cfg = small_config();
    cfg.pin_dir = Some(dir.clone());
    let first = Datapath::load(&cfg).expect("first instance");
    assert_eq!(first.pin_dir(), dir.as_path());
    for map in [
        "CONFIG",
        "SLOTS",
        "ADDR_SLOTS",
        "VETH_SLOTS",
        "NAT_EGRESS",
        "NAT_INGRESS",
        "HOST_FLOWS",
        "LOCAL_ADDRS",
        "STATS",
        "GUEST_L2",
        "POLICY",
        "RATE",
        "NAT_PORT_CURSORS",
        "NEXT_HOPS",
    ] {
        assert!(dir.join(map).exists(), "{map} is pinned");
    }
    let config_id = || {
        aya::maps::MapInfo::from_pin(dir.join("CONFIG"))
            .unwrap()
            .id()
    };
    let first_id = config_id();
    {
        // Pins are reused by a restarted agent, so a second live datapath on
        // the directory is refused rather than handed the first one's maps.
        let err = Datapath::load(&cfg).expect_err("a second live instance on the same directory");
        assert!(
            err.to_string()
                .contains("in use by another running netagent datapath"),
            "{err}"
        );
        assert_eq!(
            config_id(),
            first_id,
            "the first instance's pins are untouched"
        );
    }
    drop(first);
    assert!(!dir.exists(), "the bpffs mounted for the pins is gone");
}

/// Turns transmit checksum offload off on `dev` in `ns` (SIOCETHTOOL
/// ETHTOOL_STXCSUM), so the stack sends full checksums and the receiving stack
/// verifies them.
fn tx_checksum_off(ns: &std::fs::File, dev: &str) {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct Ifreq {
        name: [u8; 16],
        data: *mut EthtoolValue,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_STXCSUM: u32 = 0x17;
    let dev = dev.to_owned();
    inside(ns, move || {
        let mut value = EthtoolValue {
            cmd: ETHTOOL_STXCSUM,
            data: 0,
        };
        let mut req = Ifreq {
            name: [0; 16],
            data: &mut value,
            _pad: [0; 16],
        };
        req.name[..dev.len()].copy_from_slice(dev.as_bytes());
        // SAFETY: socket(2) with constant arguments; checked below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        assert!(fd >= 0);
        // SAFETY: `req` is a valid ifreq whose data points at a live ethtool_value.
        let rc = unsafe { libc::ioctl(fd, SIOCETHTOOL, &mut req) };
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd) };
        assert_eq!(
            rc,
            0,
            "SIOCETHTOOL on {dev}: {}",
            std::io::Error::last_os_error()
        );
    });
}

/// An AF_PACKET socket on `dev` in `ns` that sees every frame arriving there.
struct Capture(std::os::fd::OwnedFd);

impl Capture {
    fn open(ns: &std::fs::File, dev: &str) -> Capture {
        use std::os::fd::FromRawFd;
        let dev = std::ffi::CString::new(dev).unwrap();
        inside(ns, move || {
            let proto = (libc::ETH_P_ALL as u16).to_be();
            // SAFETY: socket(2); checked below.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: a fresh fd that nothing else owns.
            let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            // SAFETY: `dev` is a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(dev.as_ptr()) };
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: `sll` is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd,
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
            let tv = libc::timeval {
                tv_sec: 2,
                tv_usec: 0,
            };
            // SAFETY: `tv` is a valid timeval of the size given.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            Capture(owned)
        })
    }

    /// The next incoming IPv4 frame for which `want` holds.
    fn next(&self, want: impl Fn(&packet::Parsed) -> bool) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        while std::time::Instant::now() < deadline {
            let mut buf = vec![0u8; 65536];
            // SAFETY: `buf` is writable for its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return None;
            }
            buf.truncate(n as usize);
            if let Ok(p) = packet::parse(&buf)
                && want(&p)
            {
                return Some(buf);
            }
        }
        None
    }
}

/// With transmit checksum offload off everywhere, the translated packets carry
/// full checksums: verified here on the wire by the independent verifier, and by
/// the receiving stacks (which drop bad ones).
#[test]
fn checksums_are_valid_on_the_wire_with_offload_off() {
    let Some(world) = RealWorld::new('b') else {
        return;
    };
    tx_checksum_off(&world.guest_ns, "eth0");
    tx_checksum_off(&world.wan_ns, "wan0");
    let at_wan = Capture::open(&world.wan_ns, "wan0");
    let at_guest = Capture::open(&world.guest_ns, "eth0");

    // UDP guest → wan and back.
    let server = udp_socket(&world.wan_ns, sock(WAN, 7100));
    let client = udp_socket(&world.guest_ns, sock(GUEST, 0));
    client.send_to(b"checksum me", sock(WAN, 7100)).unwrap();
    let frame = at_wan
        .next(|p| p.proto == IPPROTO_UDP && p.dport == 7100)
        .expect("the datagram on the wan link");
    verify_checksums(&frame).expect("masqueraded UDP checksum on the wire");
    let (_, from) = recv(&server).expect("the wan stack accepted the datagram");
    server.send_to(b"and me", from).unwrap();
    let frame = at_guest
        .next(|p| p.proto == IPPROTO_UDP && p.sport == 7100)
        .expect("the reply on the guest link");
    verify_checksums(&frame).expect("reverse-translated UDP checksum");
    assert_eq!(packet::parse(&frame).unwrap().dst, GUEST);
    recv(&client).expect("the guest stack accepted the reply");

    // TCP: the handshake and data, checked at both ends.
    let listener = inside(&world.wan_ns, || {
        std::net::TcpListener::bind(sock(WAN, 7101)).unwrap()
    });
    let stream = inside(&world.guest_ns, || {
        std::net::TcpStream::connect_timeout(
            &sock(WAN, 7101).into(),
            std::time::Duration::from_secs(3),
        )
    })
    .expect("TCP connect with offload off");
    let syn = at_wan
        .next(|p| p.proto == IPPROTO_TCP && p.dport == 7101)
        .expect("the SYN on the wan link");
    verify_checksums(&syn).expect("masqueraded TCP checksum");
    let synack = at_guest
        .next(|p| p.proto == IPPROTO_TCP && p.sport == 7101)
        .expect("the SYN-ACK on the guest link");
    verify_checksums(&synack).expect("reverse-translated TCP checksum");
    let (mut accepted, _) = listener.accept().unwrap();
    {
        use std::io::{Read, Write};
        let mut stream = stream;
        stream.write_all(&[0xa5; 100_000]).unwrap();
        let mut got = vec![0; 100_000];
        accepted.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|b| *b == 0xa5));
    }

    // Host → guest at HostIP with offload off on the host veth too.
    tx_checksum_off(&world.host_ns, &format!("{}-veth-7", &world.names[0][..5]));
    let guest_srv = udp_socket(&world.guest_ns, sock(Ipv4Addr::UNSPECIFIED, 7102));
    let host_cli = udp_socket(&world.host_ns, sock(Ipv4Addr::UNSPECIFIED, 0));
    host_cli.send_to(b"to guest", sock(HOST_IP, 7102)).unwrap();
    let frame = at_guest
        .next(|p| p.proto == IPPROTO_UDP && p.dport == 7102)
        .expect("the host's datagram on the guest link");
    verify_checksums(&frame).expect("DNATed UDP checksum");
    let (_, from) = recv(&guest_srv).expect("the guest stack accepted it");
    guest_srv.send_to(b"to host", from).unwrap();
    let (_, from) = recv(&host_cli).expect("the host stack accepted the reply");
    assert_eq!(from, sock(HOST_IP, 7102).into());
}

/// xorshift64*: a small deterministic generator for the mutation test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Many random well-formed packets and random corruptions of them through every
/// program: the kernel accepts every run, a passed packet is never modified, and
/// a translated well-formed packet always leaves with valid checksums.
#[test]
fn random_and_mutated_packets_are_handled_safely() {
    for seed in [
        0x6e65_7461_6765_6e74,
        0x1234_5678_9abc_def1,
        0xdead_beef_f00d_cafe,
    ] {
        mutation_rounds(seed);
    }
}

fn mutation_rounds(seed: u64) {
    let Some(dp) = datapath() else { return };
    let mut rng = Rng(seed);
    let addrs = [
        GUEST, VPEER, HOST_IP, VETH_IP, UPLINK_IP, WAN, TAP_IP, ROUTER,
    ];
    let macs = [GUEST_MAC, TAP_MAC, VETH_MAC, ETH0_MAC, WAN_MAC];
    const ROUNDS: usize = 50_000;
    let mut translated = 0;
    for round in 0..ROUNDS {
        let src = rng.pick(&addrs);
        let dst = rng.pick(&addrs);
        let sport = if rng.below(2) == 0 {
            (PORT_MIN + rng.below(200) as u16).max(1)
        } else {
            rng.below(65535) as u16 + 1
        };
        let dport = rng.below(65535) as u16 + 1;
        let payload = vec![rng.below(256) as u8; rng.below(64) as usize];
        let mut pkt = match rng.below(6) {
            0 => PacketBuilder::tcp(sock(src, sport), sock(dst, dport), rng.below(64) as u8),
            1 => PacketBuilder::udp(sock(src, sport), sock(dst, dport), &payload),
            2 => PacketBuilder::udp(sock(src, sport), sock(dst, dport), &payload).udp_no_checksum(),
            3 => PacketBuilder::icmp_echo_request(src, dst, sport, 1),
            4 => PacketBuilder::icmp_echo_reply(src, dst, sport, 1),
            _ => {
                let inner = PacketBuilder::udp(sock(dst, dport), sock(src, sport), b"quoted");
                PacketBuilder::icmp(src, dst, rng.pick(&[3u8, 11, 12, 5]), 0)
                    .payload(&quote(&inner.ipv4_bytes()))
            }
        };
        pkt = pkt.macs(rng.pick(&macs), rng.pick(&macs));
        if rng.below(4) == 0 {
            pkt = pkt.ip_options(&[0x01; 4]);
        }
        let mut frame = pkt.build();
        let well_formed = rng.below(3) != 0;
        if !well_formed {
            match rng.below(3) {
                0 => {
                    let i = 14 + rng.below(40.min(frame.len() as u64 - 14)) as usize;
                    frame[i] = rng.below(256) as u8;
                }
                1 => frame.truncate(34 + rng.below(frame.len() as u64 - 33) as usize),
                _ => frame[14] = 0x40 | rng.below(16) as u8,
            }
        }
        let prog = Program::ALL[round % 4];
        let out = if prog == Program::TapIngress {
            tap(&dp, &frame)
        } else {
            dp.test_run(prog, &frame)
                .unwrap_or_else(|e| panic!("round {round}: {e}"))
        };
        // veth_ingress sends the guest's frames for the host up the host stack
        // translated (to HostIP or the vpeer address): passed, but rewritten.
        let from_guest = prog == Program::VethIngress && frame.get(26..30) == Some(&GUEST.octets());
        match out.verdict {
            TC_ACT_OK if from_guest && out.frame != frame => {
                if well_formed {
                    translated += 1;
                    verify_checksums(&out.frame)
                        .unwrap_or_else(|e| panic!("round {round} ({prog:?}, to the host): {e}"));
                }
            }
            TC_ACT_OK => assert_eq!(
                out.frame, frame,
                "round {round}: passed frames are untouched"
            ),
            TC_ACT_SHOT => {}
            TC_ACT_REDIRECT => {
                if well_formed {
                    translated += 1;
                    verify_checksums(&out.frame).unwrap_or_else(|e| {
                        panic!(
                            "round {round} ({prog:?}): {e}\n in:  {}\n out: {}",
                            hex(&frame),
                            hex(&out.frame)
                        )
                    });
                }
            }
            v => panic!("round {round}: unexpected verdict {v}"),
        }
    }
    assert!(
        translated > ROUNDS / 20,
        "only {translated} packets were translated"
    );
}

/// `tc -n NS filter show dev DEV ingress`.
fn tc_filters(ns: &str, dev: &str) -> String {
    let out = std::process::Command::new("tc")
        .args(["-n", ns, "filter", "show", "dev", dev, "ingress"])
        .output()
        .expect("run tc");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The clsact/netlink fallback (for kernels without TCX), forced: traffic flows,
/// and detaching removes the filters, also those inside the slot namespace.
#[test]
fn clsact_fallback_carries_traffic_and_detaches_cleanly() {
    let Some(world) = RealWorld::with_mode('c', AttachMode::Clsact) else {
        return;
    };
    let [h, _, s, _] = world.names.clone();
    let veth = format!("{}-veth-7", &h[..5]);
    for (ns, dev, prog) in [
        (&s, "tap0", "tap_ingress"),
        (&s, "eth0", "slot_ingress"),
        (&h, veth.as_str(), "veth_ingress"),
        (&h, "up0", "uplink_ingress"),
    ] {
        let filters = tc_filters(ns, dev);
        assert!(filters.contains(prog), "{prog} on {dev}: {filters}");
    }
    let server = udp_socket(&world.wan_ns, sock(WAN, 7200));
    let client = udp_socket(&world.guest_ns, sock(GUEST, 0));
    client.send_to(b"via clsact", sock(WAN, 7200)).unwrap();
    let (_, from) = recv(&server).expect("the wan got the datagram");
    let std::net::SocketAddr::V4(from) = from else {
        panic!("v6 peer")
    };
    assert_eq!(*from.ip(), UPLINK_IP);
    server.send_to(b"back", from).unwrap();
    recv(&client).expect("the guest got the reply");

    let RealWorld { mut dp, .. } = world;
    dp.detach_slot(SLOT).unwrap();
    for (ns, dev) in [(&s, "tap0"), (&s, "eth0"), (&h, veth.as_str())] {
        let filters = tc_filters(ns, dev);
        assert!(!filters.contains("bpf"), "{dev} still has: {filters}");
    }
    dp.detach_uplink().unwrap();
    assert!(!tc_filters(&h, "up0").contains("bpf"));
}

#[test]
fn a_new_connection_on_a_closed_tuple_is_not_reaped_as_closing() {
    let Some(mut dp) = datapath() else { return };
    let t = Timeouts::default(); // closing 10 s, established 6 h
    let out = |flags| from_vpeer(PacketBuilder::tcp(sock(VPEER, 1234), sock(WAN, 80), flags));
    let (_, port) = masquerade(&dp, &out(tcp_flags::SYN));
    let back = |flags| PacketBuilder::tcp(sock(WAN, 80), sock(UPLINK_IP, port), flags);
    run(
        &dp,
        Program::UplinkIngress,
        &back(tcp_flags::SYN | tcp_flags::ACK).build(),
    );
    // Both sides close.
    masquerade(&dp, &out(tcp_flags::FIN | tcp_flags::ACK));
    run(
        &dp,
        Program::UplinkIngress,
        &back(tcp_flags::FIN | tcp_flags::ACK).build(),
    );
    // The same tuple opens again before the reaper ran.
    let (_, port2) = masquerade(&dp, &out(tcp_flags::SYN));
    assert_eq!(port2, port);
    run(
        &dp,
        Program::UplinkIngress,
        &back(tcp_flags::SYN | tcp_flags::ACK).build(),
    );
    let egress = dp
        .maps()
        .flow(
            FlowTable::NatEgress,
            &stack_key(VPEER, 1234, WAN, 80, IPPROTO_TCP),
        )
        .unwrap()
        .unwrap();
    let ingress = dp
        .maps()
        .flow(
            FlowTable::NatIngress,
            &key(WAN, 80, UPLINK_IP, port, IPPROTO_TCP),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        (egress.state, ingress.state),
        (STATE_SYN | STATE_SLOT_NS, STATE_REPLIED | STATE_SLOT_NS)
    );
    let r = dp.reap_at(&t, netagent_now() + 60 * 1_000_000_000).unwrap();
    assert_eq!(
        r.total(),
        0,
        "established again: not reaped after 60 s idle"
    );
}
