//! `BPF_PROG_TEST_RUN` with the skb on a given device: the context's `ifindex`
//! (programs that find their slot from it, like `tap_ingress`). The kernel
//! resolves the index in the calling thread's network namespace, so the device
//! must exist there: run these inside a throwaway namespace that holds one
//! (`in_netns`).

use std::time::Duration;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

use super::{BpfError, Datapath, Program, TestRunOutput};

/// Room the output buffer leaves beyond the input frame.
const OUTPUT_HEADROOM: usize = 256;
/// Offset of `ifindex` in `struct __sk_buff`.
const SKB_IFINDEX_OFF: usize = 40;
/// `struct __sk_buff` up to and including `ifindex`: the kernel zero-fills
/// the rest of the context.
const SKB_CTX_LEN: usize = SKB_IFINDEX_OFF + 4;

impl Datapath {
    /// Runs `prog` once on `frame` as if it arrived on device `ifindex` of the
    /// calling thread's namespace (`ENODEV` if there is none).
    pub fn test_run_on(
        &self,
        prog: Program,
        frame: &[u8],
        ifindex: u32,
    ) -> Result<TestRunOutput, BpfError> {
        self.test_run_on_repeat(prog, frame, ifindex, 1)
            .map(|(out, _)| out)
    }

    /// The same `repeat` times (on the same skb: see `test_run_repeat`'s
    /// caveat); also returns the mean kernel time of one run.
    pub fn test_run_on_repeat(
        &self,
        prog: Program,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<(TestRunOutput, Duration), BpfError> {
        let name = prog.name();
        let p: &SchedClassifier = self
            .ebpf
            .program(name)
            .ok_or(BpfError::Missing {
                kind: "program",
                name,
            })?
            .try_into()
            .map_err(|e| BpfError::program(name, "type check", e))?;
        let mut ctx = [0u8; SKB_CTX_LEN];
        ctx[SKB_IFINDEX_OFF..].copy_from_slice(&ifindex.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + OUTPUT_HEADROOM];
        let result = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .map_err(|e| BpfError::program(name, "BPF_PROG_TEST_RUN", e))?;
        out.truncate(result.data_size_out as usize);
        Ok((
            TestRunOutput {
                verdict: result.return_value as i32,
                frame: out,
            },
            result.duration,
        ))
    }
}
