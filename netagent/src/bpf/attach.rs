//! Attaching the programs. A slot's three hooks (`tap0` and `eth0` inside the
//! slot namespace, the host veth outside) are netlink `cls_bpf` filters on
//! the `ingress` qdisc (see `netlink::tc`): adding one costs an expedited RCU
//! grace period (~0.2 ms here), where a TCX link waits for a full one under
//! RTNL (~15 ms each, 44 ms for a slot's three),
//! and a filter stays attached without an open fd, so a slot keeps forwarding
//! while the agent restarts and the agent's fd count does not grow per slot.
//! Each filter has priority `FILTER_PRIORITY` and the slot index as handle, so a
//! restarted agent can find and replace it. The uplink's hook is a TCX link
//! where the kernel has TCX (6.6+), which orders itself politely among other
//! users of a shared interface, and a filter otherwise. Every slot's hooks use
//! the same four programs, loaded once. A create adds them with plain netlink
//! requests on sockets that are already in the right namespace
//! (`netlink::tc`: the pooled slot namespace comes with one, the manager keeps
//! one in the agent namespace), so attaching costs six requests and no thread
//! or socket of its own.
//!
//! **Across a restart** every hook stays attached: the slots' filters need no
//! holder, and the uplink's TCX link is pinned in the bpffs directory
//! (`UPLINK_LINK_PIN`; kept a TCX link rather than made a filter because the
//! uplink is the host's shared interface, where TCX orders netagent among
//! other users, and because a pinned link goes away by itself when `netagent
//! cleanup` removes the pins). A restarted agent whose maps were reused
//! replaces the program on each hook in place — `bpf_link_update` for the
//! uplink's link, a netlink filter replace (same priority and handle) for a
//! filter — so the hook is never empty and no packet misses a program
//! (`adopt_slot`, `attach_uplink`).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use aya::programs::{
    ProgramError, SchedClassifier, TcAttachType,
    links::{FdLink, Link as _, PinnedLink},
    tc::{
        self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcError,
        TcHandle,
    },
};
use std::net::Ipv4Addr;

use netagent_common::{
    CONFIG_F_UPLINK, CONFIG_F_UPLINK_PEER, SLOT_ETH0_IFINDEX, SLOT_F_ACTIVE, SLOT_F_GUEST_VETH,
    SlotInfo,
};

use super::netns::in_netns;
use super::pins::UPLINK_LINK_PIN;
use super::test_run::Program;
use super::{BpfError, Datapath, SlotDatapath, Uplink, ip_to_map};
use crate::netlink::tc::{BpfFilter, TcSocket};

/// The tc priority of every netagent filter (lower runs first; 1 = before any
/// filter added with the kernel's default priority).
pub const FILTER_PRIORITY: u16 = 1;

/// The handle of the uplink's filter when it is one (slot filters use the slot
/// index, which is never 0).
pub const UPLINK_FILTER_HANDLE: u32 = 0xffff;

/// One attached program: a TCX link (the uplink's, held by its fd) or a netlink
/// filter (found again by its device, `FILTER_PRIORITY` and handle; nothing to
/// hold).
pub(super) enum AttachedLink {
    Tcx {
        program: Program,
        id: SchedClassifierLinkId,
    },
    /// A TCX link pinned at `path` (the uplink's): attached while the pin exists.
    PinnedTcx {
        link: FdLink,
        path: PathBuf,
    },
    Filter {
        ifindex: u32,
        handle: u32,
    },
}

/// The calling thread's network namespace.
pub(super) fn thread_netns() -> Result<OwnedFd, BpfError> {
    std::fs::File::open("/proc/thread-self/ns/net")
        .map(OwnedFd::from)
        .map_err(|e| BpfError::syscall("open /proc/thread-self/ns/net", e))
}

/// The uplink and its link.
pub(super) struct AttachedUplink {
    pub(super) uplink: Uplink,
    link: AttachedLink,
}

/// What `attach_slot` made for one slot: its filters and the keys of its lookup
/// entries (no programs: those are shared).
pub(super) struct AttachedSlot {
    /// The slot namespace, where its `tap0` and `eth0` filters are removed (the
    /// one fd the agent holds per slot).
    netns: OwnedFd,
    /// Filters inside the slot namespace (`tap_ingress`, `slot_ingress`).
    ns_links: Vec<AttachedLink>,
    /// `veth_ingress` on the host veth.
    host_link: Option<AttachedLink>,
    veth_ifindex: u32,
    addrs: [Ipv4Addr; 2],
}

fn ifname(ifindex: u32) -> Result<String, BpfError> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` has room for IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if p.is_null() {
        return Err(BpfError::syscall(
            format!("if_indextoname({ifindex})"),
            io::Error::last_os_error(),
        ));
    }
    let name = CStr::from_bytes_until_nul(&buf).map_err(|e| {
        BpfError::syscall(format!("if_indextoname({ifindex})"), io::Error::other(e))
    })?;
    Ok(name.to_string_lossy().into_owned())
}

fn classifier(ebpf: &mut aya::Ebpf, prog: Program) -> Result<&mut SchedClassifier, BpfError> {
    let name = prog.name();
    ebpf.program_mut(name)
        .ok_or(BpfError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|e| BpfError::program(name, "type check", e))
}

/// Whether a TCX attach failed because the kernel lacks TCX (then clsact is tried).
fn tcx_unsupported(e: &ProgramError) -> bool {
    match e {
        ProgramError::SyscallError(s) => matches!(
            s.io_error.raw_os_error(),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524 /* ENOTSUPP */)
        ),
        _ => false,
    }
}

/// How the uplink's program is attached (slot hooks are always filters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttachMode {
    /// A TCX link where the kernel has them (6.6+), a clsact filter otherwise.
    #[default]
    Auto,
    /// Always a clsact qdisc and a netlink filter (the fallback, forced: tests).
    Clsact,
}

/// Attaches `prog` to ingress of `ifindex` in the calling thread's namespace: a
/// TCX link (`AttachMode::Auto` and a kernel with TCX), else a netlink filter
/// with `FILTER_PRIORITY` and `handle`.
fn attach_ingress(
    ebpf: &mut aya::Ebpf,
    prog: Program,
    ifindex: u32,
    mode: AttachMode,
    handle: u32,
) -> Result<AttachedLink, BpfError> {
    let name = ifname(ifindex)?;
    let p = classifier(ebpf, prog)?;
    if mode == AttachMode::Auto {
        match p.attach(&name, TcAttachType::Ingress) {
            Ok(id) => return Ok(AttachedLink::Tcx { program: prog, id }),
            Err(e) if tcx_unsupported(&e) => {}
            Err(e) => return Err(BpfError::program(prog.name(), "attach (tcx)", e)),
        }
    }
    match tc::qdisc_add_clsact(&name) {
        Ok(()) | Err(TcError::AlreadyAttached) => {}
        Err(TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => {
            return Err(BpfError::program(
                prog.name(),
                "adding the clsact qdisc",
                ProgramError::from(e),
            ));
        }
    }
    let id = p
        .attach_with_options(
            &name,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions {
                priority: FILTER_PRIORITY,
                handle: TcHandle::from(handle),
                classid: None,
            }),
        )
        .map_err(|e| BpfError::program(prog.name(), "attach (clsact)", e))?;
    // The filter is found again by (device, priority, handle) when it goes, so
    // aya need not keep a record of it (its record of a filter owns nothing: no
    // fd, no allocation).
    let link = p
        .take_link(id)
        .map_err(|e| BpfError::program(prog.name(), "take link", e))?;
    std::mem::forget(link);
    Ok(AttachedLink::Filter { ifindex, handle })
}

/// Adds `prog` as slot `handle`'s filter on the ingress of `ifindex` (in the
/// namespace of `tc`), with the `ingress` qdisc it needs.
fn add_filter(
    ebpf: &mut aya::Ebpf,
    tc: &mut TcSocket,
    prog: Program,
    ifindex: u32,
    handle: u32,
) -> Result<AttachedLink, BpfError> {
    let p = classifier(ebpf, prog)?;
    let fd = p
        .fd()
        .map_err(|e| BpfError::program(prog.name(), "program fd", e))?;
    tc.add_ingress_qdisc(ifindex)?;
    tc.add_ingress_filter(&BpfFilter {
        ifindex,
        priority: FILTER_PRIORITY,
        handle,
        prog: fd.as_fd(),
        name: prog.name(),
    })?;
    Ok(AttachedLink::Filter { ifindex, handle })
}

/// Runs `f` in the namespace `home` (the datapath's own): directly when the
/// calling thread is there already, else on a helper thread that enters it.
fn in_home_ns<R, F>(home: &OwnedFd, f: F) -> Result<R, BpfError>
where
    R: Send,
    F: FnOnce() -> Result<R, BpfError> + Send,
{
    let here = nix::sys::stat::stat("/proc/thread-self/ns/net")
        .map_err(|e| BpfError::syscall("stat /proc/thread-self/ns/net", e.into()))?;
    let home_stat = nix::sys::stat::fstat(home.as_fd())
        .map_err(|e| BpfError::syscall("fstat of the home namespace", e.into()))?;
    if (here.st_dev, here.st_ino) == (home_stat.st_dev, home_stat.st_ino) {
        f()
    } else {
        in_netns(home.as_fd(), f)
    }
}

/// Detaches one link, in the calling thread's namespace for a filter. A filter
/// whose interface is already gone counts as detached.
fn detach(ebpf: &mut aya::Ebpf, link: AttachedLink) -> Result<(), BpfError> {
    match link {
        AttachedLink::Tcx { program, id } => classifier(ebpf, program)?
            .detach(id)
            .map_err(|e| BpfError::program(program.name(), "detach", e)),
        AttachedLink::PinnedTcx { link, path } => {
            // The pin holds the link; with it gone, closing our fd detaches it.
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(BpfError::syscall(format!("unlink {}", path.display()), e)),
            }
            drop(link);
            Ok(())
        }
        AttachedLink::Filter { ifindex, handle } => detach_filter(ifindex, handle),
    }
}

/// Replaces the program of netagent's filter with `handle` on ingress of
/// `ifindex` (calling thread's namespace) by `prog`, in place: a netlink
/// replace of the same priority and handle, so the hook is never empty. Fails
/// (ENOENT) when there is no such filter.
fn replace_filter(
    ebpf: &mut aya::Ebpf,
    prog: Program,
    ifindex: u32,
    handle: u32,
) -> Result<AttachedLink, BpfError> {
    let name = ifname(ifindex)?;
    let existing = SchedClassifierLink::attached(
        &name,
        TcAttachType::Ingress,
        FILTER_PRIORITY,
        TcHandle::from(handle),
        None,
    )
    .map_err(|e| BpfError::syscall(format!("finding the filter on {name}"), e))?;
    let p = classifier(ebpf, prog)?;
    let id = p
        .attach_to_link(existing)
        .map_err(|e| BpfError::program(prog.name(), "replace (filter)", e))?;
    let link = p
        .take_link(id)
        .map_err(|e| BpfError::program(prog.name(), "take link", e))?;
    std::mem::forget(link);
    Ok(AttachedLink::Filter { ifindex, handle })
}

/// Pins a TCX link at `path` (a filter is returned as it is).
fn pin_tcx(
    ebpf: &mut aya::Ebpf,
    link: AttachedLink,
    path: &Path,
) -> Result<AttachedLink, BpfError> {
    let AttachedLink::Tcx { program, id } = link else {
        return Ok(link);
    };
    let p = classifier(ebpf, program)?;
    let taken = p
        .take_link(id)
        .map_err(|e| BpfError::program(program.name(), "take link", e))?;
    let fd = FdLink::try_from(taken)
        .map_err(|e| BpfError::syscall("TCX link fd", io::Error::other(e.to_string())))?;
    let pinned = fd.pin(path).map_err(|e| {
        BpfError::syscall(
            format!("pin {}", path.display()),
            io::Error::other(e.to_string()),
        )
    })?;
    Ok(AttachedLink::PinnedTcx {
        link: FdLink::from(pinned),
        path: path.to_owned(),
    })
}

/// Replaces the program of a previous run's uplink hook on `ifindex` with
/// `uplink_ingress`: through the pinned TCX link (`bpf_link_update`) or the
/// filter with `UPLINK_FILTER_HANDLE`. `None` when there is no such hook.
fn replace_uplink(
    ebpf: &mut aya::Ebpf,
    ifindex: u32,
    pin: &Path,
) -> Result<Option<AttachedLink>, BpfError> {
    let prog = Program::UplinkIngress;
    if pin.exists() {
        let old = PinnedLink::from_pin(pin).map_err(|e| {
            BpfError::syscall(
                format!("open {}", pin.display()),
                io::Error::other(e.to_string()),
            )
        })?;
        let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(|e| {
            BpfError::syscall(
                format!("{} as a TCX link", pin.display()),
                io::Error::other(e.to_string()),
            )
        })?;
        let p = classifier(ebpf, prog)?;
        let id = p
            .attach_to_link(link)
            .map_err(|e| BpfError::program(prog.name(), "replace (bpf_link_update)", e))?;
        let taken = p
            .take_link(id)
            .map_err(|e| BpfError::program(prog.name(), "take link", e))?;
        let fd = FdLink::try_from(taken)
            .map_err(|e| BpfError::syscall("TCX link fd", io::Error::other(e.to_string())))?;
        return Ok(Some(AttachedLink::PinnedTcx {
            link: fd,
            path: pin.to_owned(),
        }));
    }
    match replace_filter(ebpf, prog, ifindex, UPLINK_FILTER_HANDLE) {
        Ok(link) => Ok(Some(link)),
        Err(BpfError::Program { source, .. })
            if matches!(
                &*source,
                ProgramError::TcError(TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::ENOENT)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Removes a previous run's uplink hook that is not taken over: its link pin
/// (which detaches it) and any filter running `uplink_ingress` on `ifindexes`
/// (found by program name, so nobody else's filter is touched).
fn remove_stale_uplink(pin: &Path, ifindexes: &[u32]) -> Result<(), BpfError> {
    match std::fs::remove_file(pin) {
        Ok(()) => tracing::info!(pin = %pin.display(), "removed the previous run's uplink link"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(BpfError::syscall(format!("unlink {}", pin.display()), e)),
    }
    for &ifindex in ifindexes {
        if ifindex == 0 {
            continue;
        }
        let Ok(name) = ifname(ifindex) else {
            continue;
        };
        match tc::qdisc_detach_program(&name, TcAttachType::Ingress, Program::UplinkIngress.name())
        {
            Ok(()) => tracing::info!(uplink = %name, "removed the previous run's uplink filter"),
            Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Err(TcError::NetlinkError(e))
                if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => {}
            Err(e) => {
                return Err(BpfError::program(
                    Program::UplinkIngress.name(),
                    "removing the previous run's filter",
                    ProgramError::from(e),
                ));
            }
        }
    }
    Ok(())
}

/// Removes netagent's filter with `handle` from ingress of `ifindex` in the
/// calling thread's namespace.
fn detach_filter(ifindex: u32, handle: u32) -> Result<(), BpfError> {
    let gone = |e: &io::Error| matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENOENT));
    let name = match ifname(ifindex) {
        Ok(name) => name,
        Err(BpfError::Syscall { source, .. })
            if gone(&source) || source.raw_os_error() == Some(libc::ENXIO) =>
        {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let link = match tc::SchedClassifierLink::attached(
        &name,
        TcAttachType::Ingress,
        FILTER_PRIORITY,
        TcHandle::from(handle),
        None,
    ) {
        Ok(link) => link,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => {
            return Err(BpfError::syscall(
                format!("finding the filter on {name}"),
                e,
            ));
        }
    };
    match link.detach() {
        Ok(()) => Ok(()),
        Err(ProgramError::NetlinkError(n))
        | Err(ProgramError::TcError(TcError::NetlinkError(n)))
            if matches!(
                n.raw_os_error(),
                Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::EINVAL)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(BpfError::program("filter", "detach", e)),
    }
}

impl Datapath {
    /// Attaches `uplink_ingress` to the uplink (in the namespace the datapath was
    /// loaded in, the agent's) and writes CONFIG with the uplink's address and
    /// index. A TCX link is pinned (`UPLINK_LINK_PIN`) so it outlives the agent.
    /// With maps reused from a previous run whose uplink was this interface,
    /// the previous hook's program is replaced in place instead (see the module
    /// doc; [`Datapath::uplink_adopted`]); a previous hook that cannot be taken
    /// over is removed first.
    pub fn attach_uplink(&mut self, uplink: &Uplink) -> Result<(), BpfError> {
        if let Some(u) = &self.uplink {
            return Err(BpfError::UplinkAttached(u.uplink.name.clone()));
        }
        let mut global = self.maps.global()?;
        let previous_ifindex = if global.flags & CONFIG_F_UPLINK != 0 {
            global.uplink_ifindex
        } else {
            0
        };
        let same = self.reused && previous_ifindex == uplink.ifindex;
        global.uplink_ip = ip_to_map(uplink.ipv4);
        global.uplink_ifindex = uplink.ifindex;
        global.flags |= CONFIG_F_UPLINK;
        if uplink.veth_peer {
            global.flags |= CONFIG_F_UPLINK_PEER;
        } else {
            global.flags &= !CONFIG_F_UPLINK_PEER;
        }
        self.maps.write_global(&global)?;
        let pin = self.pins.map_path(UPLINK_LINK_PIN);
        let (ebpf, mode, ifindex) = (&mut self.ebpf, self.cfg.attach_mode, uplink.ifindex);
        let attached = in_home_ns(&self.home_ns, move || {
            if same {
                match replace_uplink(ebpf, ifindex, &pin) {
                    Ok(Some(link)) => return Ok((link, true)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot take over the previous run's uplink hook; attaching anew")
                    }
                }
            }
            remove_stale_uplink(&pin, &[previous_ifindex, ifindex])?;
            let link = attach_ingress(
                ebpf,
                Program::UplinkIngress,
                ifindex,
                mode,
                UPLINK_FILTER_HANDLE,
            )?;
            match pin_tcx(ebpf, link, &pin) {
                Ok(link) => Ok((link, false)),
                Err(e) => Err(e),
            }
        });
        match attached {
            Ok((link, adopted)) => {
                self.uplink_adopted = adopted;
                self.uplink = Some(AttachedUplink {
                    uplink: uplink.clone(),
                    link,
                });
                Ok(())
            }
            Err(e) => {
                global.flags &= !(CONFIG_F_UPLINK | CONFIG_F_UPLINK_PEER);
                let _ = self.maps.write_global(&global);
                Err(e)
            }
        }
    }

    /// Detaches the uplink program and clears the uplink from CONFIG, so the slot
    /// programs stop masquerading. Idempotent.
    pub fn detach_uplink(&mut self) -> Result<(), BpfError> {
        let mut global = self.maps.global()?;
        global.flags &= !(CONFIG_F_UPLINK | CONFIG_F_UPLINK_PEER);
        self.maps.write_global(&global)?;
        match self.uplink.take() {
            Some(u) => {
                let ebpf = &mut self.ebpf;
                in_home_ns(&self.home_ns, move || detach(ebpf, u.link))
            }
            None => Ok(()),
        }
    }

    /// The uplink attached, if any.
    pub fn uplink(&self) -> Option<&Uplink> {
        self.uplink.as_ref().map(|u| &u.uplink)
    }

    /// Attaches `tap_ingress` (tap0) and `slot_ingress` (eth0) inside the slot
    /// namespace and `veth_ingress` on the host veth — the shared programs, no
    /// load — then fills SLOTS, ADDR_SLOTS (vpeer_ip, host_ip) and VETH_SLOTS and
    /// zeroes the slot's counters. `eth0` must have ifindex `SLOT_ETH0_IFINDEX`.
    /// All-or-nothing: on failure whatever was attached or written is undone.
    pub fn attach_slot(&mut self, slot: &SlotDatapath<'_>) -> Result<(), BpfError> {
        let mut slot_tc = in_netns(slot.netns, || TcSocket::open().map_err(BpfError::from))?;
        let mut host_tc = in_home_ns(&self.home_ns, || TcSocket::open().map_err(BpfError::from))?;
        self.attach_slot_with(slot, &mut slot_tc, &mut host_tc)
    }

    /// [`Datapath::attach_slot`] through tc sockets the caller opened: `slot_tc`
    /// in the slot namespace, `host_tc` in the datapath's own. No thread enters
    /// a namespace and no socket is opened: this is what a create uses.
    pub fn attach_slot_with(
        &mut self,
        slot: &SlotDatapath<'_>,
        slot_tc: &mut TcSocket,
        host_tc: &mut TcSocket,
    ) -> Result<(), BpfError> {
        self.check_index(slot.index)?;
        if self.slots.contains_key(&slot.index) {
            return Err(BpfError::SlotAttached(slot.index));
        }
        if slot.eth0_ifindex != SLOT_ETH0_IFINDEX {
            return Err(BpfError::Eth0Ifindex {
                index: slot.index,
                ifindex: slot.eth0_ifindex,
            });
        }
        let netns = slot
            .netns
            .try_clone_to_owned()
            .map_err(|e| BpfError::syscall("dup of the slot namespace fd", e))?;
        let mut attached = AttachedSlot {
            netns,
            ns_links: Vec::with_capacity(2),
            host_link: None,
            veth_ifindex: slot.veth_ifindex,
            addrs: [slot.vpeer_ip, slot.host_ip],
        };
        let index = slot.index;
        let mut attach = || -> Result<(), BpfError> {
            for (prog, ifindex) in [
                (Program::TapIngress, slot.tap_ifindex),
                (Program::SlotIngress, slot.eth0_ifindex),
            ] {
                attached
                    .ns_links
                    .push(add_filter(&mut self.ebpf, slot_tc, prog, ifindex, index)?);
            }
            attached.host_link = Some(add_filter(
                &mut self.ebpf,
                host_tc,
                Program::VethIngress,
                slot.veth_ifindex,
                index,
            )?);
            self.write_slot_maps(slot)
        };
        match attach() {
            Ok(()) => {
                self.slots.insert(slot.index, attached);
                Ok(())
            }
            Err(e) => {
                let _ = self.clear_slot_maps(
                    slot.index,
                    &attached.addrs,
                    attached.veth_ifindex,
                    Flows::Remove,
                );
                let _ = self.detach_links(attached);
                Err(e)
            }
        }
    }

    /// Takes over slot `slot` as a previous run left it (maps reused): checks
    /// that its SLOTS entry is active with the links' ifindexes, MACs and
    /// addresses, and that ADDR_SLOTS (vpeer_ip, host_ip) and VETH_SLOTS point
    /// at it; then replaces the program of its three filters in place with
    /// this datapath's (netlink replace: the hook is never empty), keeping
    /// every map entry, flow and counter. Fails naming what does not match or
    /// which filter is missing; the caller then removes the slot.
    pub fn adopt_slot(&mut self, slot: &SlotDatapath<'_>) -> Result<(), BpfError> {
        self.check_index(slot.index)?;
        let n = slot.index;
        if self.slots.contains_key(&n) {
            return Err(BpfError::SlotAttached(n));
        }
        if !self.reused {
            return Err(BpfError::Config(format!(
                "slot {n}: the maps are new (a previous run's were not reused), so its entries are gone"
            )));
        }
        let mut wrong = Vec::new();
        let info = self.maps.slot(n)?;
        if info.flags & SLOT_F_ACTIVE == 0 {
            wrong.push(format!("SLOTS[{n}] is not active"));
        } else {
            let mut field = |name: &str, have: String, want: String| {
                if have != want {
                    wrong.push(format!("SLOTS[{n}].{name} is {have}, the link has {want}"));
                }
            };
            field(
                "veth_ifindex",
                info.veth_ifindex.to_string(),
                slot.veth_ifindex.to_string(),
            );
            field(
                "eth0_ifindex",
                info.eth0_ifindex.to_string(),
                slot.eth0_ifindex.to_string(),
            );
            field(
                "tap_ifindex",
                info.tap_ifindex.to_string(),
                slot.tap_ifindex.to_string(),
            );
            field(
                "veth_mac",
                format!("{:02x?}", info.veth_mac),
                format!("{:02x?}", slot.veth_mac),
            );
            field(
                "eth0_mac",
                format!("{:02x?}", info.eth0_mac),
                format!("{:02x?}", slot.eth0_mac),
            );
            field(
                "vpeer_ip",
                super::ip_from_map(info.vpeer_ip).to_string(),
                slot.vpeer_ip.to_string(),
            );
            field(
                "host_ip",
                super::ip_from_map(info.host_ip).to_string(),
                slot.host_ip.to_string(),
            );
        }
        let addrs = self.maps.addr_slots()?;
        for addr in [slot.vpeer_ip, slot.host_ip] {
            match addrs.iter().find(|(a, _)| *a == addr) {
                Some((_, i)) if *i == n => {}
                Some((_, i)) => wrong.push(format!("ADDR_SLOTS[{addr}] is slot {i}")),
                None => wrong.push(format!("ADDR_SLOTS[{addr}] is missing")),
            }
        }
        match self
            .maps
            .veth_slots()?
            .iter()
            .find(|(ifi, _)| *ifi == slot.veth_ifindex)
        {
            Some((_, i)) if *i == n => {}
            Some((_, i)) => wrong.push(format!("VETH_SLOTS[{}] is slot {i}", slot.veth_ifindex)),
            None => wrong.push(format!("VETH_SLOTS[{}] is missing", slot.veth_ifindex)),
        }
        if !wrong.is_empty() {
            return Err(BpfError::Config(format!("slot {n}: {}", wrong.join("; "))));
        }
        let (tap_ifindex, eth0_ifindex) = (slot.tap_ifindex, slot.eth0_ifindex);
        let ebpf = &mut self.ebpf;
        let ns_links = in_netns(slot.netns, move || {
            let tap = replace_filter(ebpf, Program::TapIngress, tap_ifindex, n)?;
            let eth0 = replace_filter(ebpf, Program::SlotIngress, eth0_ifindex, n)?;
            Ok(vec![tap, eth0])
        })
        .map_err(|e| BpfError::Config(format!("slot {n}: tap0/eth0 filter: {e}")))?;
        let (ebpf, veth_ifindex) = (&mut self.ebpf, slot.veth_ifindex);
        let host_link = in_home_ns(&self.home_ns, move || {
            replace_filter(ebpf, Program::VethIngress, veth_ifindex, n)
        })
        .map_err(|e| BpfError::Config(format!("slot {n}: host veth filter: {e}")))?;
        let netns = slot
            .netns
            .try_clone_to_owned()
            .map_err(|e| BpfError::syscall("dup of the slot namespace fd", e))?;
        self.slots.insert(
            n,
            AttachedSlot {
                netns,
                ns_links,
                host_link: Some(host_link),
                veth_ifindex: slot.veth_ifindex,
                addrs: [slot.vpeer_ip, slot.host_ip],
            },
        );
        Ok(())
    }

    fn write_slot_maps(&mut self, slot: &SlotDatapath<'_>) -> Result<(), BpfError> {
        let info = SlotInfo {
            vpeer_ip: ip_to_map(slot.vpeer_ip),
            host_ip: ip_to_map(slot.host_ip),
            veth_ifindex: slot.veth_ifindex,
            eth0_ifindex: slot.eth0_ifindex,
            tap_ifindex: slot.tap_ifindex,
            flags: if slot.tap_is_veth {
                SLOT_F_ACTIVE | SLOT_F_GUEST_VETH
            } else {
                SLOT_F_ACTIVE
            },
            veth_mac: slot.veth_mac,
            eth0_mac: slot.eth0_mac,
            guest_mac: [0; 6],
            _pad: [0; 2],
        };
        self.maps.zero_stats(slot.index)?;
        self.maps.clear_guest_l2(slot.index)?;
        self.maps.set_slot(slot.index, &info)?;
        self.maps.set_addr_slot(slot.vpeer_ip, slot.index)?;
        self.maps.set_addr_slot(slot.host_ip, slot.index)?;
        self.maps.set_veth_slot(slot.veth_ifindex, slot.index)?;
        Ok(())
    }

    /// Removes the slot's lookup entries and SLOTS entry (programs then pass its
    /// packets), its flows, egress rules and bandwidth limit, and zeroes its
    /// counters.
    fn clear_slot_maps(
        &mut self,
        index: u32,
        addrs: &[Ipv4Addr],
        veth_ifindex: u32,
        flows: Flows,
    ) -> Result<(), BpfError> {
        let mut errors = Vec::new();
        let mut note = |r: Result<(), BpfError>| {
            if let Err(e) = r {
                errors.push(e);
            }
        };
        note(self.maps.set_slot(index, &SlotInfo::default()));
        for addr in addrs {
            note(self.maps.remove_addr_slot(*addr));
        }
        note(self.maps.remove_veth_slot(veth_ifindex));
        if flows == Flows::Remove {
            note(self.maps.remove_slot_flows(index).map(|_| ()));
        }
        note(self.maps.zero_stats(index));
        note(self.maps.clear_guest_l2(index));
        // Its egress rules and bandwidth limit (the next slot of this index
        // starts without them).
        note(self.maps.remove_slot_policy(index).map(|_| ()));
        note(self.maps.set_rate(index, &Default::default()));
        into_result(errors)
    }

    fn detach_links(&mut self, attached: AttachedSlot) -> Result<(), BpfError> {
        let AttachedSlot {
            netns,
            ns_links,
            host_link,
            ..
        } = attached;
        let mut errors = Vec::new();
        if let Some(link) = host_link {
            let ebpf = &mut self.ebpf;
            if let Err(e) = in_home_ns(&self.home_ns, move || detach(ebpf, link)) {
                errors.push(e);
            }
        }
        let ebpf = &mut self.ebpf;
        let in_slot = in_netns(netns.as_fd(), move || {
            let mut errors = Vec::new();
            for link in ns_links {
                if let Err(e) = detach(ebpf, link) {
                    errors.push(e);
                }
            }
            into_result(errors)
        });
        if let Err(e) = in_slot {
            errors.push(e);
        }
        into_result(errors)
    }

    /// Detaches the slot's links and removes every map entry of the slot (slot
    /// info, lookups, NAT and host-flow entries, egress rules, bandwidth limit,
    /// counters). Idempotent: an unknown
    /// slot still gets its SLOTS entry, flows and counters cleared.
    pub fn detach_slot(&mut self, index: u32) -> Result<(), BpfError> {
        self.detach_slot_with(index, Flows::Remove)
    }

    /// `detach_slot` for a slot being deleted: its filters are left to go
    /// with its devices (removing them costs netlink requests, one in the slot
    /// namespace), and its NAT and host-flow entries stay until
    /// `purge_slot_flows` (the programs already pass the packets of an inactive
    /// slot untranslated). Removing them walks every flow table (~10 ms with
    /// 100,000 flows), which slot delete does after it has answered.
    pub fn detach_slot_keeping_flows(&mut self, index: u32) -> Result<(), BpfError> {
        self.detach_slot_with(index, Flows::Keep)
    }

    /// Removes the NAT and host-flow entries of slot `index`; returns how many.
    pub fn purge_slot_flows(&mut self, index: u32) -> Result<usize, BpfError> {
        self.check_index(index)?;
        self.maps.remove_slot_flows(index)
    }

    fn detach_slot_with(&mut self, index: u32, flows: Flows) -> Result<(), BpfError> {
        self.check_index(index)?;
        let mut errors = Vec::new();
        match self.slots.remove(&index) {
            Some(attached) => {
                let (addrs, veth) = (attached.addrs, attached.veth_ifindex);
                // Maps first: from here on the programs pass this slot's packets
                // and create no new flows for it.
                if let Err(e) = self.maps.set_slot(index, &SlotInfo::default()) {
                    errors.push(e);
                }
                // A slot being deleted keeps its filters: they go with its
                // devices, which the delete removes next (the programs already
                // pass the packets of an inactive slot).
                if flows == Flows::Remove
                    && let Err(e) = self.detach_links(attached)
                {
                    errors.push(e);
                }
                if let Err(e) = self.clear_slot_maps(index, &addrs, veth, flows) {
                    errors.push(e);
                }
            }
            None => {
                // Not attached by us (e.g. a previous run): clear what is keyed by
                // the index, and any lookup entry that points at it.
                let addrs: Vec<Ipv4Addr> = self
                    .maps
                    .addr_slots()?
                    .into_iter()
                    .filter(|(_, i)| *i == index)
                    .map(|(a, _)| a)
                    .collect();
                for (ifindex, i) in self.maps.veth_slots()? {
                    if i == index
                        && let Err(e) = self.maps.remove_veth_slot(ifindex)
                    {
                        errors.push(e);
                    }
                }
                if let Err(e) = self.clear_slot_maps(index, &addrs, 0, flows) {
                    errors.push(e);
                }
            }
        }
        into_result(errors)
    }
}

/// Whether detaching a slot also removes its flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flows {
    Remove,
    Keep,
}

fn into_result(mut errors: Vec<BpfError>) -> Result<(), BpfError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(BpfError::Multiple(errors)),
    }
}
