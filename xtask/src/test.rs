//! `cargo xtask test`: build, every test of the workspace (unit, packet fixtures, e2e in
//! network namespaces), clippy and rustfmt; a summary; non-zero exit on any failure.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{build::build, cmd::Cmd};

/// The host crates that clippy and rustfmt check.
const HOST_CRATES: &[&str] = &[
    "proxy-common",
    "proxy-userspace",
    "xtask",
    "bpfproxy-tests",
    "bpfproxy-bench",
];

struct Step {
    name: &'static str,
    result: Option<Result<()>>,
    took: Duration,
}

fn timed(name: &'static str, f: impl FnOnce() -> Result<()>) -> Step {
    println!("==> test: {name}");
    let start = Instant::now();
    let result = f();
    if let Err(e) = &result {
        println!("==> test: {name} FAILED: {e:#}");
    }
    Step {
        name,
        result: Some(result),
        took: start.elapsed(),
    }
}

fn skipped(name: &'static str) -> Step {
    Step {
        name,
        result: None,
        took: Duration::ZERO,
    }
}

pub fn test(workspace: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        println!(
            "warning: not root: the end-to-end tests (network namespaces, BPF) will fail; \
             run `cargo xtask test` as root"
        );
    }
    let mut steps = Vec::new();
    let mut outputs = None;
    let mut test_output = String::new();
    steps.push(timed("build (setup, kernel programs, agent)", || {
        outputs = Some(build(workspace)?);
        Ok(())
    }));
    match &outputs {
        Some(out) => steps.push(timed("cargo test", || {
            Cmd::cargo(None)
                .current_dir(workspace)
                .env("BPFPROXY_BIN", &out.bpfproxy)
                .env("BPFPROXY_EBPF_OBJ", &out.ebpf_obj)
                // The kernel crate only builds for the BPF target (done above).
                .args([
                    "test",
                    "--workspace",
                    "--exclude",
                    "proxy-ebpf",
                    "--release",
                ])
                .run_tee(&mut test_output)
        })),
        None => steps.push(skipped("cargo test")),
    }
    let mut clippy = Cmd::cargo(None).current_dir(workspace).arg("clippy");
    for c in HOST_CRATES {
        clippy = clippy.args(["-p", c]);
    }
    if let Some(out) = &outputs {
        clippy = clippy.env("BPFPROXY_EBPF_OBJ", &out.ebpf_obj);
    }
    steps.push(timed("clippy -D warnings", || {
        clippy.args(["--all-targets", "--", "-D", "warnings"]).run()
    }));
    let mut fmt = Cmd::cargo(None)
        .current_dir(workspace)
        .args(["fmt", "--check"]);
    for c in HOST_CRATES {
        fmt = fmt.args(["-p", c]);
    }
    steps.push(timed("rustfmt --check", || fmt.run()));

    println!();
    println!("==> summary of cargo xtask test");
    let mut failed = Vec::new();
    for s in &steps {
        let status = match &s.result {
            Some(Ok(())) => "ok",
            Some(Err(_)) => {
                failed.push(s.name);
                "FAILED"
            }
            None => {
                failed.push(s.name);
                "skipped"
            }
        };
        println!(
            "  {status:<8} {:<40} {:>7.1}s",
            s.name,
            s.took.as_secs_f64()
        );
    }
    let counts = count_tests(&test_output);
    let verdict = if failed.is_empty() {
        println!("xtask test: every step succeeded");
        Ok(())
    } else {
        println!("xtask test: not passed: {}", failed.join(", "));
        Err(anyhow::anyhow!(
            "xtask test: not passed: {}",
            failed.join(", ")
        ))
    };
    // The totals over all test binaries, last, in the plain form CI reads.
    if let Some(c) = counts {
        println!(
            "tests: {} passed, {} failed, {} skipped",
            c.passed, c.failed, c.ignored
        );
    }
    verdict
}

#[derive(Debug, Default, PartialEq, Eq)]
struct TestCounts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

/// Adds up the `test result: ok. N passed; M failed; K ignored; ...` lines of `cargo test`.
fn count_tests(output: &str) -> Option<TestCounts> {
    let mut total = TestCounts::default();
    let mut any = false;
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            continue;
        };
        any = true;
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => total.passed += n,
                "failed" => total.failed += n,
                "ignored" => total.ignored += n,
                _ => {}
            }
        }
    }
    any.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_over_binaries() {
        let out = "running 3 tests\n\
                   test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.2s\n\
                   test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s\n";
        assert_eq!(
            count_tests(out),
            Some(TestCounts {
                passed: 8,
                failed: 2,
                ignored: 1
            })
        );
        assert_eq!(count_tests("nothing here"), None);
    }
}
