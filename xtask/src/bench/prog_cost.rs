//! Program cost: `BPF_PROG_TEST_RUN` with a repeat count on each datapath program.

use anyhow::{Result, bail};

use super::Plan;
use super::agent::Agent;
use super::topology::Run;

/// ns per packet of one program on one crafted packet.
#[derive(Debug, Clone)]
pub struct ProgCost {
    pub program: String,
    pub case: String,
    pub ns_per_packet: f64,
    pub verdict: i64,
}

pub fn measure(_run: &Run, _agent: &Agent, _plan: &Plan) -> Result<Vec<ProgCost>> {
    bail!("not implemented yet")
}
