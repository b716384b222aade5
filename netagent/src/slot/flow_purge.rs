//! Removing deleted slots' flows after the delete has answered.
//!
//! Finding a slot's flows means walking every flow table (~10 ms of CPU at
//! 65,536 entries), so one thread does it for every delete that happened since
//! its last walk: a burst of deletes costs a few walks, not one each, and never
//! more than one at a time. Each delete hands over its slot index with the
//! slot's lock, which is released once the slot's flows are gone, so a create
//! of the same index waits for that while every other request goes on. The
//! walk uses the flow tables on fds of their own and never holds the datapath.

use std::collections::BTreeSet;
use std::sync::mpsc;

use tokio::sync::OwnedMutexGuard;

use crate::bpf::FlowTables;

/// A deleted slot whose flows are to go, and its lock until they have.
type Job = (u32, OwnedMutexGuard<()>);

/// The purging thread; it ends when this is dropped.
#[derive(Debug)]
pub struct FlowPurger {
    jobs: mpsc::Sender<Job>,
}

impl FlowPurger {
    /// Starts the thread, which walks `tables`.
    pub fn start(tables: FlowTables) -> std::io::Result<FlowPurger> {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("flow-purge".into())
            .spawn(move || run(tables, queue))?;
        Ok(FlowPurger { jobs })
    }

    /// Queues slot `index`'s flows for removal; `held` (the slot's lock) is
    /// released once they are gone.
    pub fn purge(&self, index: u32, held: OwnedMutexGuard<()>) {
        // The thread only ends with the purger, so a send cannot fail while
        // `self` lives; were it gone, dropping the job releases the lock and
        // the reaper expires the flows.
        let _ = self.jobs.send((index, held));
    }
}

fn run(mut tables: FlowTables, queue: mpsc::Receiver<Job>) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        jobs.extend(queue.try_iter());
        let slots: BTreeSet<u32> = jobs.iter().map(|(index, _)| *index).collect();
        match tables.remove_flows_of(&slots) {
            Ok(n) => tracing::debug!(?slots, flows = n, "flows of deleted slots removed"),
            Err(e) => {
                tracing::warn!(?slots, error = %e, "removing deleted slots' flows failed; the reaper expires them")
            }
        }
        drop(jobs);
    }
}
