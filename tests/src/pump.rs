//! A TAP⇄veth frame pump: a stand-in for a VMM on a slot's `tap0`.
//!
//! ```text
//!  slot ns {p}-ns-N            guest ns (e.g. {p}-gN)
//!  tap0  <== pump threads ==>  pump0 <--veth--> eth0 169.254.0.21/30, default via .22
//! ```
//!
//! The pump opens the slot's persistent `tap0` like a VMM does and moves frames
//! between it and an `AF_PACKET` socket on `pump0`. With [`Offload::On`] both sides
//! carry a `virtio_net_hdr` (`IFF_VNET_HDR` and `PACKET_VNET_HDR`), so partial
//! checksums and GSO pass through as they would from a virtio-net guest; with
//! [`Offload::Off`] the guest's `eth0` has checksum offload off and plain frames
//! with complete checksums are moved.

use std::fs::OpenOptions;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use netagent::netlink::{Netlink, netns, tap};
use netagent::slot::addressing::{GUEST_IP, TAP_IP, TAP_PREFIX};

use crate::world::set_checksum_offload;

/// Whether checksum/segmentation offload information crosses the pump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offload {
    /// `virtio_net_hdr` on both sides; the guest's `eth0` keeps its offloads.
    On,
    /// Plain frames; the guest's `eth0` computes every checksum itself.
    Off,
}

/// Frames moved by a pump, each way.
#[derive(Debug, Default)]
pub struct PumpCounters {
    /// Guest → tap0.
    pub to_tap: AtomicU64,
    /// tap0 → guest.
    pub from_tap: AtomicU64,
}

/// A running pump; dropping it stops the threads and closes the TAP.
pub struct Pump {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<PumpCounters>,
}

const VNET_HDR_LEN: usize = 10;
const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

fn last_err(what: &str) -> anyhow::Error {
    anyhow::Error::new(std::io::Error::last_os_error()).context(what.to_string())
}

impl Pump {
    /// Opens `tap0` in the slot namespace `slot_ns`, makes the veth `pump0`⇄`eth0`
    /// inside the (existing) namespace `guest_ns`, configures `eth0` as the guest
    /// (169.254.0.21/30, default via 169.254.0.22) and starts moving frames.
    pub fn start(slot_ns: &str, guest_ns: &str, offload: Offload) -> Result<Pump> {
        let slot = netns::open(slot_ns)?;
        let guest = netns::open(guest_ns)?;
        let flags = match offload {
            Offload::On => tap::VMM_TAP_FLAGS,
            Offload::Off => tap::IFF_TAP | tap::IFF_NO_PI,
        };
        let tap_fd: OwnedFd = netns::run_in(slot.as_fd(), || -> Result<OwnedFd> {
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")?;
            tap::set_iff(&f, "tap0", flags)?;
            Ok(f.into())
        })??;

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let nl = Netlink::connect_in(guest.as_fd())?;
            nl.veth_add("pump0", "eth0", guest.as_fd()).await?;
            let p = nl.link_get("pump0").await?;
            nl.link_up(p.index).await?;
            let e = nl.link_get("eth0").await?;
            nl.addr_add(e.index, GUEST_IP, TAP_PREFIX).await?;
            nl.link_up(e.index).await?;
            nl.route_add_default(TAP_IP).await?;
            anyhow::Ok(())
        })?;

        let sock = netns::run_in(guest.as_fd(), || -> Result<OwnedFd> {
            if offload == Offload::Off {
                set_checksum_offload("eth0", false)?;
            }
            // SAFETY: plain socket(2); the result is checked before use.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as libc::c_int,
                )
            };
            if fd < 0 {
                return Err(last_err("socket(AF_PACKET)"));
            }
            // SAFETY: `fd` was just created and is owned by nothing else.
            let sock = unsafe { OwnedFd::from_raw_fd(fd) };
            let one: libc::c_int = 1;
            let set = |opt: libc::c_int| -> Result<()> {
                // SAFETY: `one` is a valid c_int for the duration of the call.
                let rc = unsafe {
                    libc::setsockopt(
                        sock.as_raw_fd(),
                        libc::SOL_PACKET,
                        opt,
                        (&raw const one).cast(),
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                if rc < 0 {
                    return Err(last_err("setsockopt(SOL_PACKET)"));
                }
                Ok(())
            };
            set(PACKET_IGNORE_OUTGOING)?;
            if offload == Offload::On {
                set(PACKET_VNET_HDR)?;
            }
            let ifindex =
                nix::net::if_::if_nametoindex("pump0").context("if_nametoindex(pump0)")?;
            // SAFETY: an all-zero sockaddr_ll is valid; the fields we need are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: `sll` is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if rc < 0 {
                return Err(last_err("bind(AF_PACKET, pump0)"));
            }
            Ok(sock)
        })??;

        let tap_fd = Arc::new(tap_fd);
        let sock = Arc::new(sock);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(PumpCounters::default());
        let mut threads = Vec::new();
        for to_tap in [true, false] {
            let (from, to) = if to_tap {
                (sock.clone(), tap_fd.clone())
            } else {
                (tap_fd.clone(), sock.clone())
            };
            let (stop, counters) = (stop.clone(), counters.clone());
            threads.push(std::thread::spawn(move || {
                shuttle(
                    &from,
                    &to,
                    &stop,
                    if to_tap {
                        &counters.to_tap
                    } else {
                        &counters.from_tap
                    },
                )
            }));
        }
        Ok(Pump {
            stop,
            threads,
            counters,
        })
    }

    /// Frames moved so far.
    pub fn counters(&self) -> &PumpCounters {
        &self.counters
    }
}

/// Moves frames from `from` to `to` until `stop`; the vnet header, when both sides
/// use one, has the same layout and is passed through untouched.
fn shuttle(from: &OwnedFd, to: &OwnedFd, stop: &AtomicBool, count: &AtomicU64) {
    let mut buf = vec![0u8; 65536 + VNET_HDR_LEN];
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: from.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, count 1.
        let rc = unsafe { libc::poll(&mut pfd, 1, 50) };
        if rc <= 0 {
            continue;
        }
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        // SAFETY: the first `n` bytes of `buf` were just written by read(2).
        let w = unsafe { libc::write(to.as_raw_fd(), buf.as_ptr().cast(), n as usize) };
        if w == n {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
