//! The driver: runs the count graph on timely workers and turns input batches into the list of
//! owners whose counts changed.
//!
//! [`Engine::apply`] takes one [`InputBatch`], diffs it against the current [`Tables`], hands
//! the updates to every worker (each feeds its share), advances all inputs to the next time,
//! steps until the probe passes it, and collects the output updates. The engine keeps the
//! current value of every output field, so it can report each touched owner's full new counts
//! and leave out owners whose values did not change.
//!
//! Threads: `workers` timely worker threads, plus the caller's. The caller blocks in `apply`
//! (in the daemon, inside `spawn_blocking`).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

use differential_dataflow::input::InputSession;
use timely::WorkerConfig;

use crate::counts::{AllCounts, CountChanges, DeploymentCounts, EventCounts, ImageCounts};
use crate::graph::{self, Field, Inputs, Output, Owner, Time};
use crate::hashing::IdMap;
use crate::model::{Id, InputBatch};
use crate::tables::{Tables, Updates};

/// Why the engine could not apply a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// A worker thread is gone (it panicked); the engine cannot continue.
    WorkerStopped,
    /// Timely refused the configuration.
    Start(String),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::WorkerStopped => write!(f, "a dataflow worker stopped"),
            EngineError::Start(e) => write!(f, "cannot start dataflow workers: {e}"),
        }
    }
}

impl std::error::Error for EngineError {}

/// One batch for the workers: the updates of one time.
struct Command {
    time: Time,
    updates: Arc<Updates>,
}

/// A worker's output for one time.
struct Report {
    output: Vec<(Output, isize)>,
}

/// The count engine: input tables, timely workers running the graph, and the current counts.
pub struct Engine {
    /// The current input rows, to diff upserts against and for the oracle.
    tables: Tables,
    /// The current value of every output field (absent means 0 / NULL).
    values: IdMap<(Owner, Field), i64>,
    /// The time the next batch is applied at.
    time: Time,
    /// One command channel per worker.
    commands: Vec<Sender<Command>>,
    /// Every worker's reports.
    reports: Receiver<Report>,
    /// Joins the worker threads on drop (after `commands` closes, they finish their loop).
    guards: Option<timely::communication::WorkerGuards<()>>,
}

impl Engine {
    /// Starts `workers` timely worker threads (at least one) running the count graph.
    pub fn new(workers: usize) -> Result<Self, EngineError> {
        let workers = workers.max(1);
        let (report_tx, reports) = channel::<Report>();
        let mut commands = Vec::with_capacity(workers);
        let mut receivers = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (tx, rx) = channel::<Command>();
            commands.push(tx);
            receivers.push(Some(rx));
        }
        let receivers = Arc::new(Mutex::new(receivers));
        let report_tx = Arc::new(Mutex::new(report_tx));
        let config = timely::Config {
            communication: if workers == 1 {
                timely::CommunicationConfig::Thread
            } else {
                timely::CommunicationConfig::Process(workers)
            },
            worker: WorkerConfig::default(),
        };
        let guards = timely::execute(config, move |worker| {
            let index = worker.index();
            let peers = worker.peers();
            let Some(commands) = receivers.lock().ok().and_then(|mut r| r.get_mut(index).and_then(Option::take)) else {
                return;
            };
            let Ok(reports) = report_tx.lock().map(|tx| tx.clone()) else {
                return;
            };
            let output: Rc<RefCell<Vec<(Output, isize)>>> = Rc::new(RefCell::new(Vec::new()));
            let mut inputs = Inputs::new();
            let sink = Rc::clone(&output);
            let probe = worker.dataflow::<Time, _, _>(|scope| {
                let (probe, _) = graph::build(scope, &mut inputs)
                    .inspect(move |(data, _time, diff)| sink.borrow_mut().push((*data, *diff)))
                    .probe();
                probe
            });
            while let Ok(Command { time, updates }) = commands.recv() {
                feed(&mut inputs, &updates, index, peers);
                inputs.advance_to(time + 1);
                worker.step_while(|| probe.less_than(&(time + 1)));
                let output = std::mem::take(&mut *output.borrow_mut());
                if reports.send(Report { output }).is_err() {
                    return;
                }
            }
        })
        .map_err(EngineError::Start)?;
        Ok(Engine {
            tables: Tables::default(),
            values: IdMap::default(),
            time: 0,
            commands,
            reports,
            guards: Some(guards),
        })
    }

    /// Applies one batch of row changes at the next time and returns the owners whose counts
    /// changed, with their new values.
    pub fn apply(&mut self, batch: &InputBatch) -> Result<CountChanges, EngineError> {
        let updates = self.tables.apply(batch);
        if updates.is_empty() {
            return Ok(CountChanges::default());
        }
        let updates = Arc::new(updates);
        let time = self.time;
        self.time += 1;
        for commands in &self.commands {
            commands.send(Command { time, updates: Arc::clone(&updates) }).map_err(|_| EngineError::WorkerStopped)?;
        }
        let mut output: IdMap<Output, isize> = IdMap::default();
        for _ in 0..self.commands.len() {
            let report = self.reports.recv().map_err(|_| EngineError::WorkerStopped)?;
            for (record, diff) in report.output {
                *output.entry(record).or_insert(0) += diff;
            }
        }
        output.retain(|_, diff| *diff != 0);
        Ok(self.absorb(output))
    }

    /// Folds one time's consolidated output into `values` and reports the changed owners.
    fn absorb(&mut self, output: IdMap<Output, isize>) -> CountChanges {
        let touched: BTreeSet<Owner> = output.keys().map(|((owner, _field), _value)| *owner).collect();
        let before: Vec<OwnerCounts> = touched.iter().map(|owner| self.owner_counts(*owner)).collect();
        // Retractions first: a changed field retracts its old value and inserts the new one.
        for (((owner, field), value), diff) in &output {
            if *diff < 0 && self.values.get(&(*owner, *field)) == Some(value) {
                self.values.remove(&(*owner, *field));
            }
        }
        for (((owner, field), value), diff) in &output {
            if *diff > 0 {
                self.values.insert((*owner, *field), *value);
            }
        }
        let mut changes = CountChanges::default();
        for (owner, before) in touched.into_iter().zip(before) {
            let after = self.owner_counts(owner);
            if after == before {
                continue;
            }
            match (owner, after) {
                (Owner::Image(id), OwnerCounts::Image(c)) => changes.images.push((id, c)),
                (Owner::Event(id), OwnerCounts::Event(c)) => changes.events.push((id, c)),
                (Owner::Deployment(id), OwnerCounts::Deployment(c)) => changes.deployments.push((id, c)),
                _ => {}
            }
        }
        changes
    }

    /// An owner's current counts, `None` inside when the owner row does not exist.
    fn owner_counts(&self, owner: Owner) -> OwnerCounts {
        let get = |field| self.values.get(&(owner, field)).copied();
        let exists = get(Field::Exists).is_some();
        let n = |field| get(field).unwrap_or(0);
        match owner {
            Owner::Image(_) => OwnerCounts::Image(exists.then(|| ImageCounts { detections: n(Field::Detections) })),
            Owner::Event(_) => OwnerCounts::Event(exists.then(|| EventCounts {
                captures: n(Field::Captures),
                detections: n(Field::Detections),
                occurrences: n(Field::Occurrences),
                start: get(Field::FirstCapture),
                end: get(Field::LastCapture),
            })),
            Owner::Deployment(_) => OwnerCounts::Deployment(exists.then(|| DeploymentCounts {
                events: n(Field::Events),
                captures: n(Field::Captures),
                total_size: (n(Field::SizedImages) > 0).then(|| n(Field::TotalSize)),
                detections: n(Field::Detections),
                occurrences: n(Field::Occurrences),
                taxa: n(Field::Taxa),
                first_capture: get(Field::FirstCapture),
                last_capture: get(Field::LastCapture),
            })),
        }
    }

    /// Every existing owner's current counts.
    pub fn snapshot(&self) -> AllCounts {
        let mut all = AllCounts::default();
        for (owner, field) in self.values.keys() {
            if *field != Field::Exists {
                continue;
            }
            match self.owner_counts(*owner) {
                OwnerCounts::Image(Some(c)) => {
                    all.images.insert(owner_id(*owner), c);
                }
                OwnerCounts::Event(Some(c)) => {
                    all.events.insert(owner_id(*owner), c);
                }
                OwnerCounts::Deployment(Some(c)) => {
                    all.deployments.insert(owner_id(*owner), c);
                }
                _ => {}
            }
        }
        all
    }

    /// The current input rows.
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The number of batches that changed something so far (the dataflow's current time).
    pub fn time(&self) -> Time {
        self.time
    }

    /// The number of worker threads.
    pub fn workers(&self) -> usize {
        self.commands.len()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the command channels ends every worker's loop; the guards then join them.
        self.commands.clear();
        drop(self.guards.take());
    }
}

/// One owner's counts, typed by owner kind; `None` when the owner row does not exist.
#[derive(Debug, PartialEq, Eq)]
enum OwnerCounts {
    Image(Option<ImageCounts>),
    Event(Option<EventCounts>),
    Deployment(Option<DeploymentCounts>),
}

fn owner_id(owner: Owner) -> Id {
    match owner {
        Owner::Image(id) | Owner::Event(id) | Owner::Deployment(id) => id,
    }
}

/// Feeds this worker's share (every `peers`-th update) of `updates` into the inputs.
fn feed(inputs: &mut Inputs, updates: &Updates, index: usize, peers: usize) {
    fn share<R: Clone, D>(
        session: &mut InputSession<Time, D, isize>,
        updates: &[((Id, R), isize)],
        index: usize,
        peers: usize,
        project: impl Fn(Id, &R) -> D,
    ) where
        D: differential_dataflow::Data,
    {
        for ((id, row), diff) in updates.iter().skip(index).step_by(peers) {
            session.update(project(*id, row), *diff);
        }
    }
    share(&mut inputs.images, &updates.images, index, peers, |id, r| (id, r.clone()));
    share(&mut inputs.detections, &updates.detections, index, peers, |_id, r| r.clone());
    share(&mut inputs.occurrences, &updates.occurrences, index, peers, |id, r| (id, r.clone()));
    share(&mut inputs.taxa, &updates.taxa, index, peers, |id, r| (id, r.clone()));
    share(&mut inputs.projects, &updates.projects, index, peers, |id, r| (id, r.clone()));
    share(&mut inputs.include_taxa, &updates.include_taxa, index, peers, |_id, r| (r.project, r.taxon));
    share(&mut inputs.exclude_taxa, &updates.exclude_taxa, index, peers, |_id, r| (r.project, r.taxon));
    share(&mut inputs.events, &updates.events, index, peers, |id, r| (id, r.clone()));
    share(&mut inputs.deployments, &updates.deployments, index, peers, |id, r| (id, r.clone()));
}
