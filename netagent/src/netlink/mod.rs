//! The kernel topology through rtnetlink, TUN ioctls and `/proc/sys` — never a
//! subprocess.
//!
//! One module per object, mirroring rtnetlink: `netns` (named namespaces and running
//! code inside one), `link`, `addr`, `route` (verbs on [`Netlink`], a connection bound
//! to one namespace), `tap` (persistent TAP devices), `tc` (the ingress qdisc and BPF filters on a blocking
//! socket) and `sysctl`.
//!
//! A netlink socket talks to the namespace it was created in, whatever thread later
//! uses it. [`Netlink::connect_in`] therefore creates the socket on a short-lived
//! thread that has joined the target namespace, and drives it from the caller's tokio
//! runtime.

pub mod addr;
pub mod link;
pub mod netns;
pub mod netns_pool;
pub mod route;
pub mod sysctl;
pub mod tap;
pub mod tc;

use std::io;
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd};
use std::sync::Arc;

use rtnetlink::sys::{Socket, TokioSocket, protocols::NETLINK_ROUTE};

/// A failed netlink, ioctl, mount or `/proc` operation.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The kernel refused a netlink request.
    #[error("{op}: {source}")]
    Netlink {
        /// What was being done, e.g. `add address 10.12.0.2/31 to wrenn-veth-1`.
        op: String,
        /// The error rtnetlink reported.
        #[source]
        source: rtnetlink::Error,
    },
    /// A system call or file operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done, e.g. `create netns wrenn-ns-1`.
        op: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An object that must exist does not.
    #[error("{0} does not exist")]
    NotFound(String),
    /// A thread used to enter a namespace panicked.
    #[error("{0}: the helper thread panicked")]
    ThreadPanicked(String),
}

impl NetlinkError {
    /// Wraps an rtnetlink error with a description of the operation.
    pub fn netlink(op: impl Into<String>, source: rtnetlink::Error) -> Self {
        NetlinkError::Netlink {
            op: op.into(),
            source,
        }
    }

    /// Wraps an I/O error with a description of the operation.
    pub fn io(op: impl Into<String>, source: impl Into<io::Error>) -> Self {
        NetlinkError::Io {
            op: op.into(),
            source: source.into(),
        }
    }

    /// The errno behind this error, if there is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Netlink {
                source: rtnetlink::Error::NetlinkError(msg),
                ..
            } => Some(msg.raw_code().abs()),
            NetlinkError::Io { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// True when the error means "the object is already gone" (deleting it again is
    /// a success): ENODEV, ENOENT, ESRCH, EADDRNOTAVAIL or [`NetlinkError::NotFound`].
    pub fn is_gone(&self) -> bool {
        matches!(self, NetlinkError::NotFound(_))
            || matches!(
                self.errno(),
                Some(libc::ENODEV | libc::ENOENT | libc::ESRCH | libc::EADDRNOTAVAIL)
            )
    }

    /// True when the error is EEXIST.
    pub fn is_exists(&self) -> bool {
        self.errno() == Some(libc::EEXIST)
    }
}

/// Result of this module's operations.
pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

/// An rtnetlink connection bound to one network namespace. Cheap to clone; the
/// connection task stops when the last clone is dropped.
#[derive(Clone)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    /// A netlink socket runs one dump at a time (a second one fails with EBUSY):
    /// every dump on this connection holds this lock.
    dump_lock: Arc<tokio::sync::Mutex<()>>,
    _conn: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Netlink {
    /// Connects to the namespace `ns` (an fd of a `/proc/*/ns/net` or `/run/netns`
    /// file). Must be called inside a tokio runtime, which drives the connection.
    pub fn connect_in(ns: BorrowedFd<'_>) -> Result<Netlink> {
        let socket = netns::run_in(ns, || Socket::new(NETLINK_ROUTE))?
            .map_err(|e| NetlinkError::io("open a netlink socket", e))?;
        Self::from_socket(socket)
    }

    /// Connects to the namespace of the calling thread.
    pub fn connect_current() -> Result<Netlink> {
        let socket =
            Socket::new(NETLINK_ROUTE).map_err(|e| NetlinkError::io("open a netlink socket", e))?;
        Self::from_socket(socket)
    }

    /// Connects through `socket` (a route netlink socket, opened in the
    /// namespace to talk to). Must be called inside a tokio runtime.
    pub fn from_socket(socket: Socket) -> Result<Netlink> {
        socket
            .set_non_blocking(true)
            .map_err(|e| NetlinkError::io("make the netlink socket non-blocking", e))?;
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is the netlink socket we own (just released from `Socket`);
        // ownership moves into the TokioSocket, nothing else closes it.
        let socket = unsafe { TokioSocket::from_raw_fd(fd) };
        let (conn, handle, _messages) = rtnetlink::from_socket(socket);
        let task = tokio::spawn(conn);
        Ok(Netlink {
            handle,
            dump_lock: Arc::new(tokio::sync::Mutex::new(())),
            _conn: Arc::new(AbortOnDrop(task)),
        })
    }

    /// The underlying rtnetlink handle, for requests this module does not wrap.
    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }
}
