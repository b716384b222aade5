//! Persistent TAP devices through `/dev/net/tun` ioctls.
//!
//! The device is created in the network namespace of the thread that opens
//! `/dev/net/tun`, so callers run [`create_persistent`] inside the slot namespace
//! (see [`super::netns::run_in`]). Addresses, MAC, txqueuelen and link state are then
//! set over netlink like any other link.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

use super::{NetlinkError, Result};

/// `TUNSETIFF`: `_IOW('T', 202, int)`.
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETPERSIST`: `_IOW('T', 203, int)`.
pub const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
/// `TUNSETIFINDEX`: `_IOW('T', 218, unsigned int)`; before `TUNSETIFF`, the
/// ifindex the new device gets.
pub const TUNSETIFINDEX: libc::c_ulong = 0x4004_54da;
/// `IFF_TAP`.
pub const IFF_TAP: i16 = 0x0002;
/// `IFF_NO_PI`.
pub const IFF_NO_PI: i16 = 0x1000;
/// `IFF_VNET_HDR`.
pub const IFF_VNET_HDR: i16 = 0x4000;
/// Flags a VMM (Firecracker, QEMU) opens the slot's TAP with.
pub const VMM_TAP_FLAGS: i16 = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

/// `struct ifreq` as the TUN ioctls read it: the name and `ifr_flags`, padded to
/// the kernel's 40 bytes.
#[repr(C)]
pub struct IfReq {
    /// NUL-terminated interface name.
    pub name: [u8; libc::IFNAMSIZ],
    /// `ifr_flags`.
    pub flags: i16,
    _pad: [u8; 22],
}

const _: () = assert!(std::mem::size_of::<IfReq>() == 40);

impl IfReq {
    /// An ifreq for `name` (at most 15 bytes) with `flags`.
    pub fn new(name: &str, flags: i16) -> Result<IfReq> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(NetlinkError::io(
                format!("interface name {name:?}"),
                std::io::Error::from_raw_os_error(libc::EINVAL),
            ));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }
}

/// Attaches an open `/dev/net/tun` fd to the TAP `name` (creating it if absent)
/// with `flags`.
pub fn set_iff(fd: &impl AsRawFd, name: &str, flags: i16) -> Result<()> {
    let req = IfReq::new(name, flags)?;
    // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes, which `IfReq` is) through
    // the pointer, which is valid for the duration of the call; `fd` is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &req as *const IfReq) };
    if rc < 0 {
        return Err(NetlinkError::io(
            format!("TUNSETIFF {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Asks for ifindex `index` for the device the next `TUNSETIFF` on `fd` creates
/// (the fd must not be attached to a device yet).
pub fn set_ifindex(fd: &impl AsRawFd, index: u32) -> Result<()> {
    let index: libc::c_uint = index;
    // SAFETY: TUNSETIFINDEX reads one `unsigned int` through the pointer, which is
    // valid for the duration of the call; `fd` is open.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFINDEX, &index as *const libc::c_uint) };
    if rc < 0 {
        return Err(NetlinkError::io(
            format!("TUNSETIFINDEX {index}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Creates the persistent TAP `name` in the calling thread's namespace, configured
/// for a VMM that opens it with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, with ifindex
/// `index` (`None`: the kernel picks one). The device stays after this returns
/// (until deleted over netlink or with its namespace).
pub fn create_persistent(name: &str, index: Option<u32>) -> Result<()> {
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| NetlinkError::io("open /dev/net/tun", e))?;
    create_persistent_on(tun, name, index)
}

/// As [`create_persistent`], through `tun`, a `/dev/net/tun` file opened earlier
/// (the TAP is made in the namespace `tun` was opened in, whichever thread
/// calls this). `tun` is closed at the end; the device stays.
pub fn create_persistent_on(tun: std::fs::File, name: &str, index: Option<u32>) -> Result<()> {
    if let Some(index) = index {
        set_ifindex(&tun, index)?;
    }
    set_iff(&tun, name, VMM_TAP_FLAGS)?;
    // SAFETY: TUNSETPERSIST takes an integer argument by value; `tun` is open and
    // attached to the device.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(NetlinkError::io(
            format!("TUNSETPERSIST {name}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
