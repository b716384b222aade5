//! IPv4 addresses on links.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};

use super::{Netlink, NetlinkError, Result};

/// An IPv4 address on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addr {
    /// Link index.
    pub index: u32,
    /// The address.
    pub ip: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
}

fn addr_of(msg: &AddressMessage) -> Option<Addr> {
    // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
    // point-to-point links); fall back to IFA_ADDRESS where LOCAL is absent.
    let mut local = None;
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(IpAddr::V4(ip)) => local = Some(*ip),
            AddressAttribute::Address(IpAddr::V4(ip)) => address = Some(*ip),
            _ => {}
        }
    }
    Some(Addr {
        index: msg.header.index,
        ip: local.or(address)?,
        prefix: msg.header.prefix_len,
    })
}

impl Netlink {
    /// Adds `ip/prefix` to link `index`.
    pub async fn addr_add(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(ip), prefix)
            .execute()
            .await
            .map_err(|e| {
                NetlinkError::netlink(format!("add address {ip}/{prefix} to link #{index}"), e)
            })
    }

    /// Every IPv4 address of the namespace (all links).
    pub async fn addr_list(&self) -> Result<Vec<Addr>> {
        let _dump = self.dump_lock.lock().await;
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::netlink("list addresses", e))?;
        Ok(msgs.iter().filter_map(addr_of).collect())
    }

    /// IPv4 addresses of link `index`.
    pub async fn addr_list_link(&self, index: u32) -> Result<Vec<Addr>> {
        let mut all = self.addr_list().await?;
        all.retain(|a| a.index == index);
        Ok(all)
    }

    /// Removes `ip/prefix` from link `index`; an address already gone is a success
    /// (`Ok(false)`).
    pub async fn addr_del(&self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<bool> {
        let dump = self.dump_lock.lock().await;
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::netlink(format!("list addresses of link #{index}"), e))?;
        let Some(msg) = msgs.into_iter().find(|m| {
            addr_of(m).is_some_and(|a| a.index == index && a.ip == ip && a.prefix == prefix)
        }) else {
            return Ok(false);
        };
        drop(dump);
        match self.handle.address().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let err = NetlinkError::netlink(
                    format!("delete address {ip}/{prefix} from link #{index}"),
                    e,
                );
                if err.is_gone() { Ok(false) } else { Err(err) }
            }
        }
    }
}
