//! A small stock of [`Prepared`] network namespaces, refilled in the background,
//! so that slot create does not pay for making one. Making a namespace is the
//! costliest step of a create (the kernel sets up every per-namespace subsystem,
//! ~1 ms, more on a busy host, plus a thread to `unshare` in); taking one from
//! the stock is a `Vec::pop`. A stocked namespace has no name and nothing in it
//! but `lo`: if the agent goes away, the kernel frees it.
//!
//! One refill thread makes namespaces while the stock is below its target and
//! sleeps otherwise; `take` wakes it. With the stock empty (a burst of creates
//! larger than it), create makes its namespace itself, as without a pool.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::netns::{self, Prepared};

/// After a failed `prepare`, the refill thread waits this long before the next.
const RETRY_AFTER: Duration = Duration::from_secs(1);

struct Stock {
    ready: Vec<Prepared>,
    stopping: bool,
}

struct Shared {
    stock: Mutex<Stock>,
    wake: Condvar,
    target: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Stock> {
        self.stock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The stock and its refill thread (stopped, and the stock freed, on drop).
pub struct NetnsPool {
    shared: Arc<Shared>,
    refill: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NetnsPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetnsPool")
            .field("target", &self.shared.target)
            .field("ready", &self.ready())
            .finish()
    }
}

impl NetnsPool {
    /// Starts a pool that keeps `target` namespaces ready (0: a pool that is
    /// always empty, no thread).
    pub fn start(target: usize) -> NetnsPool {
        let shared = Arc::new(Shared {
            stock: Mutex::new(Stock {
                ready: Vec::with_capacity(target),
                stopping: false,
            }),
            wake: Condvar::new(),
            target,
        });
        let refill = (target > 0).then(|| {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("netns-pool".into())
                .spawn(move || refill(&shared))
                .ok()
        });
        NetnsPool {
            shared,
            refill: refill.flatten(),
        }
    }

    /// A ready namespace, if the stock has one; the refill thread makes the next.
    pub fn take(&self) -> Option<Prepared> {
        let taken = self.shared.lock().ready.pop();
        self.shared.wake.notify_one();
        taken
    }

    /// How many namespaces are ready now.
    pub fn ready(&self) -> usize {
        self.shared.lock().ready.len()
    }
}

fn refill(shared: &Shared) {
    loop {
        {
            let mut stock = shared.lock();
            while !stock.stopping && stock.ready.len() >= shared.target {
                stock = shared.wake.wait(stock).unwrap_or_else(|e| e.into_inner());
            }
            if stock.stopping {
                return;
            }
        }
        match netns::prepare() {
            Ok(p) => shared.lock().ready.push(p),
            Err(e) => {
                tracing::warn!(error = %e, "preparing a namespace for the pool failed");
                let stock = shared.lock();
                let _ = shared.wake.wait_timeout(stock, RETRY_AFTER);
            }
        }
    }
}

impl Drop for NetnsPool {
    fn drop(&mut self) {
        self.shared.lock().stopping = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.refill.take() {
            let _ = t.join();
        }
        self.shared.lock().ready.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty pool hands out nothing and starts no thread.
    #[test]
    fn a_pool_of_zero_is_empty() {
        let pool = NetnsPool::start(0);
        assert!(pool.take().is_none());
        assert_eq!(pool.ready(), 0);
        assert!(pool.refill.is_none());
    }
}
