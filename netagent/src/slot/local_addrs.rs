//! Keeps LOCAL_ADDRS equal to the agent namespace's own IPv4 addresses, so that
//! guest-initiated traffic to any of them is refused (`host_denied`) — also for
//! an address added after the agent started, whose live guest flows the
//! datapath side cuts when the set changes (`Datapath::set_local_addrs`).
//!
//! [`refresh`] lists the namespace's addresses and writes the set (LOCAL_ADDRS is
//! updated by difference: an address that stays is never absent in between).
//! Addresses inside the slots' two /16s (`host_base`, `vrt_base`: every slot's
//! host veth address) are left out, since the datapath refuses those ranges as a
//! whole. [`spawn_monitor`] subscribes to the namespace's IPv4 address
//! notifications (`RTMGRP_IPV4_IFADDR`) and refreshes on every change; the
//! reaper refreshes as well, which repairs anything a lost notification missed.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::Weak;

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::{RouteNetlinkMessage, address::AddressAttribute};
use rtnetlink::sys::{Socket, SocketAddr, TokioSocket, protocols::NETLINK_ROUTE};

use crate::netlink::{NetlinkError, netns};

use super::manager::SlotManager;

/// `RTMGRP_IPV4_IFADDR`: the multicast group of IPv4 address changes.
const RTMGRP_IPV4_IFADDR: u32 = 0x10;

/// Whether `ip` lies in the /16 starting at `base`.
fn in_slash16(ip: Ipv4Addr, base: Ipv4Addr) -> bool {
    u32::from(ip) >> 16 == u32::from(base) >> 16
}

/// The addresses LOCAL_ADDRS holds: `all` without those in the two slot /16s,
/// sorted, without duplicates.
pub fn host_addrs(all: &[Ipv4Addr], host_base: Ipv4Addr, vrt_base: Ipv4Addr) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> = all
        .iter()
        .copied()
        .filter(|ip| !in_slash16(*ip, host_base) && !in_slash16(*ip, vrt_base))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Lists the agent namespace's addresses and writes LOCAL_ADDRS; returns them.
pub async fn refresh(mgr: &SlotManager) -> Result<Vec<Ipv4Addr>, super::SlotError> {
    let all: Vec<Ipv4Addr> = mgr
        .host()
        .addr_list()
        .await
        .map_err(|e| super::SlotError::Start {
            step: "list the agent namespace's addresses",
            source: e.into(),
        })?
        .into_iter()
        .map(|a| a.ip)
        .collect();
    let cfg = mgr.config();
    let addrs = host_addrs(&all, cfg.host_base, cfg.vrt_base);
    mgr.with_datapath(|dp| dp.set_local_addrs(&addrs))??;
    Ok(addrs)
}

/// A netlink socket in namespace `ns` that receives IPv4 address changes.
fn subscribe(ns: BorrowedFd<'_>) -> Result<TokioSocket, NetlinkError> {
    let mut socket = netns::run_in(ns, || Socket::new(NETLINK_ROUTE))?
        .map_err(|e| NetlinkError::io("open a netlink socket", e))?;
    socket
        .bind(&SocketAddr::new(0, RTMGRP_IPV4_IFADDR))
        .map_err(|e| NetlinkError::io("subscribe to IPv4 address changes", e))?;
    socket
        .set_non_blocking(true)
        .map_err(|e| NetlinkError::io("make the netlink socket non-blocking", e))?;
    let fd = socket.into_raw_fd();
    // SAFETY: `fd` is the netlink socket we own (just released from `Socket`);
    // ownership moves into the TokioSocket, nothing else closes it.
    Ok(unsafe { TokioSocket::from_raw_fd(fd) })
}

/// Whether an address notification may change LOCAL_ADDRS: it names an IPv4
/// address outside the slots' two /16s (or is not an address message at all).
fn concerns_host(
    msg: &NetlinkMessage<RouteNetlinkMessage>,
    host_base: Ipv4Addr,
    vrt_base: Ipv4Addr,
) -> bool {
    let NetlinkPayload::InnerMessage(
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a),
    ) = &msg.payload
    else {
        return true;
    };
    let mut v4 = a.attributes.iter().filter_map(|attr| match attr {
        AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
            Some(*ip)
        }
        _ => None,
    });
    v4.any(|ip| !in_slash16(ip, host_base) && !in_slash16(ip, vrt_base))
}

/// Starts the task that refreshes LOCAL_ADDRS on every address change in the
/// namespace `ns`; it ends when the manager is dropped (the manager aborts it at
/// shutdown). Must be called inside a tokio runtime.
pub fn spawn_monitor(
    mgr: Weak<SlotManager>,
    ns: BorrowedFd<'_>,
) -> Result<tokio::task::JoinHandle<()>, NetlinkError> {
    let (host_base, vrt_base) = match mgr.upgrade() {
        Some(m) => (m.config().host_base, m.config().vrt_base),
        None => return Err(NetlinkError::NotFound("the slot manager".into())),
    };
    let socket = subscribe(ns)?;
    let (conn, _handle, mut changes) = rtnetlink::from_socket(socket);
    Ok(tokio::spawn(async move {
        let conn = tokio::spawn(conn);
        while let Some((first, _)) = changes.next().await {
            // One refresh for a burst of notifications, and none for a burst of
            // slot veth addresses only (every create adds one, and a refresh
            // lists every address of the namespace).
            let mut relevant = concerns_host(&first, host_base, vrt_base);
            while let Ok((msg, _)) = changes.try_recv() {
                relevant |= concerns_host(&msg, host_base, vrt_base);
            }
            if !relevant {
                continue;
            }
            let Some(mgr) = mgr.upgrade() else { break };
            match refresh(&mgr).await {
                Ok(addrs) => tracing::debug!(?addrs, "agent namespace addresses changed"),
                Err(e) => tracing::warn!(error = %e, "refreshing LOCAL_ADDRS failed"),
            }
        }
        conn.abort();
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_address(ip: &str) -> NetlinkMessage<RouteNetlinkMessage> {
        let mut a = rtnetlink::packet_route::address::AddressMessage::default();
        a.attributes
            .push(AddressAttribute::Local(IpAddr::V4(ip.parse().unwrap())));
        NetlinkMessage::from(RouteNetlinkMessage::NewAddress(a))
    }

    /// A slot's veth address (every create adds one) does not make the monitor
    /// list every address of the namespace again; any other address does.
    #[test]
    fn only_host_addresses_trigger_a_refresh() {
        let (h, v) = (Ipv4Addr::new(10, 11, 0, 0), Ipv4Addr::new(10, 12, 0, 0));
        assert!(!concerns_host(&new_address("10.12.0.2"), h, v));
        assert!(!concerns_host(&new_address("10.11.3.4"), h, v));
        assert!(concerns_host(&new_address("192.0.2.7"), h, v));
        assert!(concerns_host(&new_address("10.13.0.1"), h, v));
    }

    #[test]
    fn slot_ranges_are_left_out() {
        let all: Vec<Ipv4Addr> = [
            "198.18.0.1",
            "127.0.0.1",
            "10.12.0.2",
            "10.12.3.4",
            "10.11.0.9",
            "10.13.0.1",
            "127.0.0.1",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        let got = host_addrs(
            &all,
            Ipv4Addr::new(10, 11, 0, 0),
            Ipv4Addr::new(10, 12, 0, 0),
        );
        let want: Vec<Ipv4Addr> = ["10.13.0.1", "127.0.0.1", "198.18.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
    }
}
