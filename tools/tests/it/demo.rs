//! `tally-tools demo` end to end: the binary runs without services, streams results, edits a filter,
//! and its maintained counts equal the from-scratch recompute.

use std::process::Command;

fn demo(args: &[&str]) -> String {
    let out =
        Command::new(env!("CARGO_BIN_EXE_tally-tools")).arg("demo").args(args).output().expect("tally-tools demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "tally-tools demo {args:?} failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn demo_counts_match_the_recompute() {
    let out = demo(&["--nights", "3", "--images-per-night", "50"]);
    assert!(out.contains("✓ every maintained count equals the from-scratch recompute"), "{out}");
    assert!(out.contains("filter edit:"), "no filter edit reported:\n{out}");
    assert!(out.contains("filter edit after 75 results: included family"), "mid-stream edit line missing:\n{out}");
    assert!(out.contains("incremental (dataflow)"), "no timing table:\n{out}");
}

#[test]
fn demo_on_antennas_taxonomy_with_two_workers() {
    let taxa = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/taxa-quebec-vermont-2022.json");
    let out = demo(&["--taxa", taxa, "--nights", "2", "--images-per-night", "40", "-w", "2", "--batch", "8"]);
    assert!(out.contains("taxonomy: 4,120 taxa (69 families, 942 genera, 3108 species)"), "{out}");
    assert!(out.contains("✓ every maintained count equals the from-scratch recompute"), "{out}");
}

#[test]
fn demo_rejects_a_missing_taxonomy_file() {
    let out = Command::new(env!("CARGO_BIN_EXE_tally-tools"))
        .args(["demo", "--taxa", "/nonexistent/taxa.json"])
        .output()
        .expect("tally runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read taxonomy file /nonexistent/taxa.json"), "{stderr}");
}
