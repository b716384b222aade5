//! Running code inside another network namespace.
//!
//! Interface names and indices, TCX links and netlink requests all resolve in the
//! calling *thread's* namespace. So work inside a slot namespace runs on a scoped
//! thread that first `setns`es into it; the caller's thread never changes
//! namespace.

use std::io;
use std::os::fd::BorrowedFd;

use nix::sched::{CloneFlags, setns};

use super::BpfError;

/// Runs `f` on a fresh thread inside the network namespace `netns` and returns
/// its result.
pub fn in_netns<R, F>(netns: BorrowedFd<'_>, f: F) -> Result<R, BpfError>
where
    R: Send,
    F: FnOnce() -> Result<R, BpfError> + Send,
{
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| {
                BpfError::syscall("setns(CLONE_NEWNET) into the slot namespace", e.into())
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|_| {
            Err(BpfError::syscall(
                "the namespace worker thread",
                io::Error::other("panicked"),
            ))
        })
    })
}
