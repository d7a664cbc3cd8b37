//! An idle engine stops working: between batches worker 0 finishes the merges its
//! arrangements have begun, then waits, using no CPU; `Engine::settle` waits for that.
//!
//! Alone in its own test binary, so that the only timely worker thread in the process is
//! this engine's.

use std::time::Duration;

use tally_dataflows::{Deployment, Detection, Engine, Event, Image, InputBatch, Occurrence, Project, Score, Taxon};

/// `images` images of one event, eight valid detections each, each with its own occurrence.
fn load(first_image: i64, images: i64) -> InputBatch {
    let mut batch = InputBatch::default();
    for i in first_image..first_image + images {
        batch.images.push((
            i,
            Some(Image {
                event: Some(1),
                deployment: Some(1),
                project: Some(1),
                timestamp: Some(i * 1_000_000),
                size: Some(1_000),
            }),
        ));
        for k in 0..8 {
            let d = i * 8 + k;
            batch.detections.push((d, Some(Detection { image: i, occurrence: Some(d), valid: true })));
            batch.occurrences.push((
                d,
                Some(Occurrence {
                    event: Some(1),
                    deployment: Some(1),
                    determination: Some(1 + d % 3),
                    score: Some(Score::new((d % 10) as f64 / 10.0)),
                }),
            ));
        }
    }
    batch
}

/// User plus system CPU time of this process's timely worker threads, in clock ticks.
fn worker_ticks() -> u64 {
    let mut ticks = 0;
    for task in std::fs::read_dir("/proc/self/task").expect("/proc/self/task") {
        let path = task.expect("task").path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if !name.starts_with("timely:work") {
            continue;
        }
        let stat = std::fs::read_to_string(path.join("stat")).expect("stat");
        // Fields after the command name, which is in parentheses: utime and stime are the
        // 14th and 15th fields of the line, the 12th and 13th after it.
        let after = &stat[stat.rfind(')').expect("comm") + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        ticks += fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    }
    ticks
}

#[test]
fn an_idle_engine_uses_no_cpu() {
    let mut engine = Engine::new(1).expect("engine");
    let mut setup = InputBatch::default();
    setup.projects.push((1, Some(Project { threshold: Score::new(0.5) })));
    setup.deployments.push((1, Some(Deployment { project: Some(1) })));
    setup.events.push((1, Some(Event { deployment: Some(1), project: Some(1) })));
    for t in 1..=3 {
        setup.taxa.push((t, Some(Taxon { ancestors: vec![] })));
    }
    engine.apply(&setup).expect("setup");
    // Batches of growing size, so that the arrangements hold batches of several sizes and
    // merges are under way when the last one returns.
    let mut first = 0;
    for images in [1_000, 2_000, 4_000, 8_000, 3_000] {
        engine.apply(&load(first, images)).expect("load");
        first += images;
    }
    // Time to finish any merge in progress (a few hundred milliseconds at most here).
    std::thread::sleep(Duration::from_secs(2));
    let before = worker_ticks();
    std::thread::sleep(Duration::from_secs(2));
    let spent = worker_ticks() - before;
    // Clock ticks are 10 ms; a worker spinning while idle would spend ~200.
    assert!(spent <= 2, "the idle worker spent {spent} clock ticks of CPU in 2 s");
    // And it still answers.
    let changes = engine.apply(&load(first, 1)).expect("one more image");
    assert_eq!(changes.images.len(), 1);
    first += 1;

    // `settle` returns once the merges are done: the worker is quiet at once.
    engine.apply(&load(first, 8_000)).expect("load");
    engine.settle().expect("settle");
    let before = worker_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let spent = worker_ticks() - before;
    assert!(spent <= 2, "the settled worker spent {spent} clock ticks of CPU in 1 s");
}
