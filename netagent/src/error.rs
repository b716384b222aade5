//! Errors of the daemon (`netagent up`) and of the CLI commands. Each variant says
//! what failed and what to do; the API's own errors live in `api` and the
//! controller's in `controller`.

use std::io;
use std::path::PathBuf;

use crate::api::client::ClientError;
use crate::config::ConfigError;

/// Why `netagent up` could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The process lacks capabilities the datapath needs.
    #[error(
        "missing privileges: netagent up needs {missing} (run it as root, or grant the capabilities, e.g. with AmbientCapabilities= in its systemd unit)"
    )]
    MissingPrivileges {
        /// The capabilities that are missing, comma-separated.
        missing: String,
    },
    /// The kernel lacks a feature the datapath needs.
    #[error("kernel feature missing: {feature} ({hint})")]
    MissingKernelFeature {
        /// What is missing.
        feature: String,
        /// What to do about it.
        hint: String,
    },
    /// Another instance holds this prefix's lock file.
    #[error(
        "another netagent instance is running with prefix {prefix:?} (lock {lock} held{holder}); stop it first or use another --prefix"
    )]
    PrefixLocked {
        /// The prefix.
        prefix: String,
        /// The lock file.
        lock: PathBuf,
        /// ", by pid N" when the lock file names its holder.
        holder: String,
    },
    /// Another instance answers on the socket.
    #[error(
        "another netagent instance is already serving on {socket}; stop it first or use another --socket"
    )]
    SocketInUse {
        /// The socket path.
        socket: PathBuf,
    },
    /// Something that is not a socket sits at the socket path.
    #[error("{socket} exists and is not a Unix socket: remove it or choose another --socket")]
    SocketPathOccupied {
        /// The socket path.
        socket: PathBuf,
    },
    /// A system call on a path failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done ("create socket directory", "bind socket", ...).
        what: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The loopback TCP address of `api_tcp` cannot be bound.
    #[error("cannot listen on api_tcp {addr}: {source} (choose another port or remove api_tcp)")]
    BindTcp {
        /// The address.
        addr: std::net::SocketAddr,
        /// The underlying error.
        source: io::Error,
    },
    /// Mounting the bpffs failed.
    #[error(
        "cannot mount a bpffs at {path}: {source} (netagent needs CAP_SYS_ADMIN to mount it, or mount it first: mount -t bpf bpf {path})"
    )]
    MountBpffs {
        /// The mount point.
        path: PathBuf,
        /// The errno.
        source: nix::Error,
    },
    /// The slot manager (datapath and topology) failed to start.
    #[error("cannot start the datapath: {0}")]
    Start(String),
    /// Shutdown could not remove everything.
    #[error("shutdown left resources behind: {0} (run `netagent cleanup` with the same --prefix)")]
    Shutdown(String),
    /// Installing a signal handler failed.
    #[error("cannot install the {signal} handler: {source}")]
    Signal {
        /// Signal name.
        signal: &'static str,
        /// The underlying error.
        source: io::Error,
    },
}

/// Why a CLI command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `netagent up` failed.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Talking to the daemon failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `netagent cleanup` failed.
    #[error("cleanup failed: {0}")]
    Cleanup(String),
    /// The tokio runtime could not be built.
    #[error("cannot start the async runtime: {0}")]
    Runtime(io::Error),
    /// Writing the output failed.
    #[error("cannot write output: {0}")]
    Output(io::Error),
}
