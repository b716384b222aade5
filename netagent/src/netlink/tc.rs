//! tc (traffic control) requests on a blocking route netlink socket: the
//! `ingress` qdisc and direct-action `cls_bpf` filters on a device's ingress.
//!
//! The datapath attaches a slot's three hooks this way on every create. A
//! [`TcSocket`] talks to the namespace it was opened in, so a slot's hooks are
//! attached through the socket its pooled namespace came with and the host
//! veth's through one socket the datapath keeps: no thread that enters a
//! namespace and no socket opened per request. The filters are the ones aya's
//! netlink attach makes (parent clsact ingress, protocol `ETH_P_ALL`, the given
//! priority and handle, the program's name, direct action), so either can find
//! and remove the other's.
//!
//! The qdisc is `ingress`, not `clsact`: the slots' devices need no egress
//! hook, and every tc block a qdisc binds on a device without tc offload
//! (veth, tun) goes on a list that the kernel walks, under one global mutex,
//! on every later bind (`flow_indr_dev_setup_offload`): with `clsact`'s two
//! blocks per device that walk was the largest cost of a create at 1,000
//! slots. The filters' parent (`ffff:fff2`) is the same for both qdiscs.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::packet_route::tc::{
    TcAttribute, TcBpfFlags, TcFilterBpfOption, TcHandle, TcMessage, TcOption,
};
use rtnetlink::sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::{NetlinkError, Result};

/// `ETH_P_ALL`: the filter sees every protocol.
const ETH_P_ALL: u16 = 0x0003;

/// A direct-action BPF filter on a device's ingress.
#[derive(Debug, Clone, Copy)]
pub struct BpfFilter<'a> {
    /// The device.
    pub ifindex: u32,
    /// The filter's priority (preference).
    pub priority: u16,
    /// The filter's handle (unique per device and priority).
    pub handle: u32,
    /// The program.
    pub prog: BorrowedFd<'a>,
    /// The program's name, as `tc filter show` lists it.
    pub name: &'a str,
}

/// A blocking route netlink socket for tc requests, bound to the namespace it
/// was opened in.
#[derive(Debug)]
pub struct TcSocket {
    socket: Socket,
    seq: u32,
}

impl TcSocket {
    /// Opens a socket in the calling thread's namespace.
    pub fn open() -> Result<TcSocket> {
        let socket = Socket::new(NETLINK_ROUTE)
            .map_err(|e| NetlinkError::io("open a netlink socket for tc", e))?;
        TcSocket::from_socket(socket)
    }

    /// Uses `socket` (a route netlink socket; its namespace is the one it was
    /// opened in).
    pub fn from_socket(mut socket: Socket) -> Result<TcSocket> {
        socket
            .set_non_blocking(false)
            .map_err(|e| NetlinkError::io("make the tc netlink socket blocking", e))?;
        socket
            .bind_auto()
            .map_err(|e| NetlinkError::io("bind the tc netlink socket", e))?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .map_err(|e| NetlinkError::io("connect the tc netlink socket", e))?;
        Ok(TcSocket { socket, seq: 0 })
    }

    /// Adds the `ingress` qdisc to `ifindex`; one that is there already (or a
    /// `clsact`, which has an ingress too) is fine.
    pub fn add_ingress_qdisc(&mut self, ifindex: u32) -> Result<()> {
        let mut msg = TcMessage::with_index(index_i32(ifindex)?);
        msg.header.handle = TcHandle::from(0xffff_0000);
        msg.header.parent = TcHandle::INGRESS;
        msg.attributes.push(TcAttribute::Kind("ingress".into()));
        match self.request(
            RouteNetlinkMessage::NewQueueDiscipline(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        ) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
        .map_err(|e| NetlinkError::io(format!("add the ingress qdisc to link #{ifindex}"), e))
    }

    /// Adds `filter` to the ingress of its device (a qdisc with an ingress must
    /// be there). Fails
    /// with `EEXIST` if the device has a filter with that priority and handle.
    pub fn add_ingress_filter(&mut self, filter: &BpfFilter<'_>) -> Result<()> {
        let mut msg = TcMessage::with_index(index_i32(filter.ifindex)?);
        msg.header.handle = TcHandle::from(filter.handle);
        msg.header.parent = TcHandle {
            major: TcHandle::CLSACT.major,
            minor: TcHandle::MIN_INGRESS,
        };
        msg.header.info = (u32::from(filter.priority) << 16) | u32::from(ETH_P_ALL.to_be());
        msg.attributes.push(TcAttribute::Kind("bpf".into()));
        let fd = u32::try_from(filter.prog.as_raw_fd()).map_err(|_| {
            NetlinkError::io(
                "attach a filter",
                io::Error::from(io::ErrorKind::InvalidInput),
            )
        })?;
        msg.attributes.push(TcAttribute::Options(vec![
            TcOption::Bpf(TcFilterBpfOption::ProgFd(fd)),
            TcOption::Bpf(TcFilterBpfOption::ProgName(filter.name.to_string())),
            TcOption::Bpf(TcFilterBpfOption::Flags(TcBpfFlags::DirectAction)),
        ]));
        self.request(
            RouteNetlinkMessage::NewTrafficFilter(msg),
            NLM_F_CREATE | NLM_F_EXCL,
        )
        .map_err(|e| {
            NetlinkError::io(
                format!(
                    "attach {} to the ingress of link #{} (priority {}, handle {})",
                    filter.name, filter.ifindex, filter.priority, filter.handle
                ),
                e,
            )
        })
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, payload: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = NetlinkMessage::from(payload);
        msg.header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        msg.header.sequence_number = seq;
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut rx = Vec::with_capacity(4096);
        loop {
            rx.clear();
            let n = self.socket.recv(&mut rx, 0)?;
            let mut off = 0;
            while off < n {
                let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = reply.header.length as usize;
                if reply.header.sequence_number == seq
                    && let NetlinkPayload::Error(e) = reply.payload
                {
                    return match e.code {
                        None => Ok(()),
                        Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                    };
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }
}

fn index_i32(ifindex: u32) -> Result<i32> {
    i32::try_from(ifindex).map_err(|_| {
        NetlinkError::io(
            format!("link #{ifindex}"),
            io::Error::from(io::ErrorKind::InvalidInput),
        )
    })
}
