//! IPv4 routes in the main table.

use std::net::Ipv4Addr;

use futures::TryStreamExt;
use rtnetlink::RouteMessageBuilder;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};

use super::{Netlink, NetlinkError, Result};

/// An IPv4 route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination (0.0.0.0 for the default route).
    pub dst: Ipv4Addr,
    /// Destination prefix length.
    pub prefix: u8,
    /// Gateway, if any.
    pub gateway: Option<Ipv4Addr>,
    /// Output interface index, if any.
    pub oif: Option<u32>,
    message: RouteMessage,
}

impl Route {
    fn from_message(msg: RouteMessage) -> Route {
        let mut route = Route {
            dst: Ipv4Addr::UNSPECIFIED,
            prefix: msg.header.destination_prefix_length,
            gateway: None,
            oif: None,
            message: RouteMessage::default(),
        };
        for attr in &msg.attributes {
            match attr {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.dst = *ip,
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(*ip),
                RouteAttribute::Oif(index) => route.oif = Some(*index),
                _ => {}
            }
        }
        route.message = msg;
        route
    }

    /// True for `0.0.0.0/0`.
    pub fn is_default(&self) -> bool {
        self.prefix == 0
    }
}

impl Netlink {
    /// Adds `dst/prefix via gateway`.
    pub async fn route_add_via(&self, dst: Ipv4Addr, prefix: u8, gateway: Ipv4Addr) -> Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .gateway(gateway)
            .build();
        self.handle.route().add(msg).execute().await.map_err(|e| {
            NetlinkError::netlink(format!("add route {dst}/{prefix} via {gateway}"), e)
        })
    }

    /// Adds the default route via `gateway`.
    pub async fn route_add_default(&self, gateway: Ipv4Addr) -> Result<()> {
        self.route_add_via(Ipv4Addr::UNSPECIFIED, 0, gateway).await
    }

    /// Adds the host route `dst/32 via gateway`.
    pub async fn route_add_host(&self, dst: Ipv4Addr, gateway: Ipv4Addr) -> Result<()> {
        self.route_add_via(dst, 32, gateway).await
    }

    /// IPv4 routes of the main table.
    pub async fn route_list(&self) -> Result<Vec<Route>> {
        let _dump = self.dump_lock.lock().await;
        let msgs: Vec<RouteMessage> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(|e| NetlinkError::netlink("list routes", e))?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.table == RouteHeader::RT_TABLE_MAIN)
            .map(Route::from_message)
            .collect())
    }

    /// Routes whose output interface is `oif`.
    pub async fn route_list_oif(&self, oif: u32) -> Result<Vec<Route>> {
        let mut routes = self.route_list().await?;
        routes.retain(|r| r.oif == Some(oif));
        Ok(routes)
    }

    /// The default route, if there is one.
    pub async fn route_default(&self) -> Result<Option<Route>> {
        Ok(self.route_list().await?.into_iter().find(Route::is_default))
    }

    /// Deletes a route returned by [`Netlink::route_list`]; already gone is
    /// `Ok(false)`.
    pub async fn route_del(&self, route: &Route) -> Result<bool> {
        match self
            .handle
            .route()
            .del(route.message.clone())
            .execute()
            .await
        {
            Ok(()) => Ok(true),
            Err(e) => {
                let err = NetlinkError::netlink(
                    format!("delete route {}/{}", route.dst, route.prefix),
                    e,
                );
                if err.is_gone() { Ok(false) } else { Err(err) }
            }
        }
    }

    /// Deletes `dst/prefix` from the main table (any gateway, any interface)
    /// without a dump; `Ok(false)` if there was none.
    pub async fn route_del_dst(&self, dst: Ipv4Addr, prefix: u8) -> Result<bool> {
        // As `ip route del`: protocol unspecified and scope "nowhere" match any.
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere)
            .build();
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(true),
            Err(e) => {
                let err = NetlinkError::netlink(format!("delete route {dst}/{prefix}"), e);
                if err.is_gone() { Ok(false) } else { Err(err) }
            }
        }
    }
}
