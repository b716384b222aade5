//! Links: veth pairs, up/down, MTU, MAC, txqueuelen, delete, look-ups.

use std::os::fd::{AsRawFd, BorrowedFd};

use futures::TryStreamExt;
use rtnetlink::packet_route::link::{
    InfoData, InfoVeth, LinkAttribute, LinkFlags, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, LinkVeth};

use super::{Netlink, NetlinkError, Result};

/// What the agent needs to know about a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Interface index (per namespace).
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// Hardware address (empty for links without one, e.g. `lo` has zeros).
    pub mac: Vec<u8>,
    /// MTU.
    pub mtu: u32,
    /// Transmit queue length.
    pub txqueuelen: u32,
    /// Administratively up (IFF_UP).
    pub up: bool,
    /// The kind (`veth`, `tun`, ...) if the kernel reports one.
    pub kind: Option<String>,
    /// For a link with a peer (a veth), the id of the namespace the peer lives
    /// in, as this namespace knows it; `None` when the peer is in this namespace.
    pub peer_netnsid: Option<i32>,
}

impl Link {
    /// The MAC as six bytes (zeros if the link has no Ethernet address).
    pub fn mac6(&self) -> [u8; 6] {
        let mut mac = [0u8; 6];
        if self.mac.len() == 6 {
            mac.copy_from_slice(&self.mac);
        }
        mac
    }

    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: Vec::new(),
            mtu: 0,
            txqueuelen: 0,
            up: msg.header.flags.contains(LinkFlags::Up),
            kind: None,
            peer_netnsid: None,
        };
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name.clone(),
                LinkAttribute::Address(mac) => link.mac = mac.clone(),
                LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
                LinkAttribute::TxQueueLen(len) => link.txqueuelen = *len,
                LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(*id),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        if let NlLinkInfo::Kind(kind) = info {
                            link.kind = Some(kind.to_string());
                        }
                    }
                }
                _ => {}
            }
        }
        link
    }
}

/// One end of a veth pair to create.
#[derive(Debug, Clone, Copy)]
pub struct VethEnd<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its ifindex.
    pub index: u32,
    /// Its MAC address.
    pub mac: [u8; 6],
}

impl Netlink {
    /// Creates a veth pair: `name` in this connection's namespace and `peer` placed
    /// directly into the namespace `peer_ns` (both down).
    pub async fn veth_add(&self, name: &str, peer: &str, peer_ns: BorrowedFd<'_>) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::default()
            .name(peer)
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(name, peer)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::netlink(format!("create veth pair {name} / {peer}"), e))
    }

    /// Creates a veth pair in this connection's namespace with both ifindexes
    /// given: `name` gets `index`, `peer` gets `peer_index` (the kernel honours the
    /// peer's index only when the main device's is explicit too). Both down.
    pub async fn veth_add_indexed(
        &self,
        name: &str,
        index: u32,
        peer: &str,
        peer_index: u32,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::default()
            .name(peer)
            .index(peer_index)
            .build();
        let msg = LinkVeth::new(name, peer)
            .index(index)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            NetlinkError::netlink(
                format!("create veth pair {name} (#{index}) / {peer} (#{peer_index})"),
                e,
            )
        })
    }

    /// Creates a veth pair with both ifindexes given: `name` (index `index`) in
    /// this connection's namespace, `peer` (index `peer_index`) placed directly
    /// into the namespace `peer_ns`. Both down.
    pub async fn veth_add_indexed_peer_ns(
        &self,
        name: &str,
        index: u32,
        peer: &str,
        peer_index: u32,
        peer_ns: BorrowedFd<'_>,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::default()
            .name(peer)
            .index(peer_index)
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(name, peer)
            .index(index)
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            NetlinkError::netlink(
                format!("create veth pair {name} (#{index}) / {peer} (#{peer_index})"),
                e,
            )
        })
    }

    /// Creates a veth pair with the ifindexes and MACs given, both ends down:
    /// `this` in this connection's namespace, `peer` placed directly into the
    /// namespace `peer_ns`. (Down, so that an ingress qdisc can be added before
    /// they open: on a link that is up, adding one waits for an RCU grace
    /// period, `dev_deactivate`.)
    pub async fn veth_add_pair(
        &self,
        this: &VethEnd<'_>,
        peer: &VethEnd<'_>,
        peer_ns: BorrowedFd<'_>,
    ) -> Result<()> {
        let peer_msg = LinkMessageBuilder::<LinkUnspec>::default()
            .name(peer.name)
            .index(peer.index)
            .address(peer.mac.to_vec())
            .setns_by_fd(peer_ns.as_raw_fd())
            .build();
        let msg = LinkVeth::new(this.name, peer.name)
            .index(this.index)
            .address(this.mac.to_vec())
            .set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg)))
            .build();
        self.handle.link().add(msg).execute().await.map_err(|e| {
            NetlinkError::netlink(
                format!(
                    "create veth pair {} (#{}) / {} (#{})",
                    this.name, this.index, peer.name, peer.index
                ),
                e,
            )
        })
    }

    /// Looks a link up by name; `Ok(None)` if there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<Link>> {
        let mut stream = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) => {
                let err = NetlinkError::netlink(format!("look up link {name}"), e);
                if err.is_gone() { Ok(None) } else { Err(err) }
            }
        }
    }

    /// Looks a link up by name; [`NetlinkError::NotFound`] if there is none.
    pub async fn link_get(&self, name: &str) -> Result<Link> {
        self.link_by_name(name)
            .await?
            .ok_or_else(|| NetlinkError::NotFound(format!("link {name}")))
    }

    /// Looks a link up by index; `Ok(None)` if there is none.
    pub async fn link_by_index(&self, index: u32) -> Result<Option<Link>> {
        let mut stream = self.handle.link().get().match_index(index).execute();
        match stream.try_next().await {
            Ok(Some(msg)) => Ok(Some(Link::from_message(&msg))),
            Ok(None) => Ok(None),
            Err(e) => {
                let err = NetlinkError::netlink(format!("look up link #{index}"), e);
                if err.is_gone() { Ok(None) } else { Err(err) }
            }
        }
    }

    /// Every link of the namespace.
    pub async fn link_list(&self) -> Result<Vec<Link>> {
        let _dump = self.dump_lock.lock().await;
        self.handle
            .link()
            .get()
            .execute()
            .map_ok(|msg| Link::from_message(&msg))
            .try_collect()
            .await
            .map_err(|e| NetlinkError::netlink("list links", e))
    }

    /// Links whose name starts with `prefix`.
    pub async fn link_list_prefix(&self, prefix: &str) -> Result<Vec<Link>> {
        let mut links = self.link_list().await?;
        links.retain(|l| l.name.starts_with(prefix));
        Ok(links)
    }

    async fn link_set(&self, op: String, msg: LinkMessage) -> Result<()> {
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::netlink(op, e))
    }

    /// Sets the link up.
    pub async fn link_up(&self, index: u32) -> Result<()> {
        self.link_set(
            format!("set link #{index} up"),
            LinkUnspec::new_with_index(index).up().build(),
        )
        .await
    }

    /// Sets the link down.
    pub async fn link_down(&self, index: u32) -> Result<()> {
        self.link_set(
            format!("set link #{index} down"),
            LinkUnspec::new_with_index(index).down().build(),
        )
        .await
    }

    /// Renames the link (it must be down).
    pub async fn link_set_name(&self, index: u32, name: &str) -> Result<()> {
        self.link_set(
            format!("rename link #{index} to {name}"),
            LinkUnspec::new_with_index(index).name(name).build(),
        )
        .await
    }

    /// Sets the MTU.
    pub async fn link_set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        self.link_set(
            format!("set mtu {mtu} on link #{index}"),
            LinkUnspec::new_with_index(index).mtu(mtu).build(),
        )
        .await
    }

    /// Sets the MAC address.
    pub async fn link_set_mac(&self, index: u32, mac: [u8; 6]) -> Result<()> {
        self.link_set(
            format!(
                "set mac {} on link #{index}",
                crate::slot::addressing::format_mac(&mac)
            ),
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
        )
        .await
    }

    /// Sets the MAC address and the transmit queue length and sets the link
    /// up, in one request.
    pub async fn link_set_mac_txqueuelen_up(
        &self,
        index: u32,
        mac: [u8; 6],
        len: u32,
    ) -> Result<()> {
        self.link_set(
            format!(
                "set mac {}, txqueuelen {len} and up on link #{index}",
                crate::slot::addressing::format_mac(&mac)
            ),
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .txqueuelen(len)
                .up()
                .build(),
        )
        .await
    }

    /// Moves the link into the namespace `ns`, renaming it to `new_name`.
    pub async fn link_move(&self, index: u32, ns: BorrowedFd<'_>, new_name: &str) -> Result<()> {
        self.link_set(
            format!("move link #{index} to another namespace as {new_name}"),
            LinkUnspec::new_with_index(index)
                .setns_by_fd(ns.as_raw_fd())
                .name(new_name)
                .build(),
        )
        .await
    }

    /// Deletes the link. A link that is already gone is a success (`Ok(false)`).
    pub async fn link_del(&self, index: u32) -> Result<bool> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let err = NetlinkError::netlink(format!("delete link #{index}"), e);
                if err.is_gone() { Ok(false) } else { Err(err) }
            }
        }
    }

    /// Deletes the link called `name`, if it exists (`Ok(false)` if it did not).
    pub async fn link_del_by_name(&self, name: &str) -> Result<bool> {
        match self.link_by_name(name).await? {
            Some(link) => self.link_del(link.index).await.map_err(|e| match e {
                NetlinkError::Netlink { source, .. } => {
                    NetlinkError::netlink(format!("delete link {name}"), source)
                }
                e => e,
            }),
            None => Ok(false),
        }
    }
}

/// Kind name of a veth link as the kernel reports it.
pub const KIND_VETH: &str = "veth";

/// Kind name of a TUN/TAP link as the kernel reports it.
pub const KIND_TUN: &str = "tun";
