//! The driver: runs the count graph on timely workers and turns input batches into the list of
//! owners whose counts changed.
//!
//! [`Engine::apply`] takes one [`InputBatch`] and hands it to timely worker 0, which feeds it
//! into the graph's inputs as upserts at the next time, advances them, and steps until the
//! probe passes that time. The inputs exchange every row to the worker that owns its id, where
//! an upsert arrangement holds the current row and turns the upsert into a retraction of the
//! old version and an insertion of the new one. So no process keeps a copy of the rows: the
//! graph's own arrangements are the only state, partitioned over every worker of every
//! process. The output (count changes) is exchanged back to worker 0. The engine keeps the
//! current value of every output field, so it can report each touched owner's full new counts
//! and leave out owners whose values did not change.
//!
//! Where the workers run is a [`Topology`]: threads of this process, or a timely cluster of
//! processes that talk over timely's own TCP networking. Process 0 of a cluster is the one
//! that holds the [`Engine`]; every other process runs [`run_peer`], holds its share of the
//! state, and takes no input of its own.
//!
//! Threads: the workers of this process, plus the caller's. The caller blocks in `apply` (in
//! the daemon, inside `block_in_place`), or hands a batch over with [`Engine::submit`], does
//! other work while the workers compute, and blocks only in [`Engine::collect`] (ingest writes
//! a batch's rows to Postgres meanwhile).

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use differential_dataflow::trace::ExertionLogic;
use timely::dataflow::operators::{Exchange, Inspect, Probe};
use timely::WorkerConfig;

use crate::counts::{AllCounts, CountChanges, DeploymentCounts, EventCounts, ImageCounts};
use crate::graph::{self, Field, Inputs, Output, Owner, Time};
use crate::hashing::{IdMap, IdSet};
use crate::model::{Id, InputBatch};

/// Why the engine could not start or apply a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineError {
    /// A worker is gone (it panicked, or a process of the cluster was lost); the engine cannot
    /// continue and must be started again.
    WorkerStopped,
    /// Timely refused the configuration, or the cluster could not be formed.
    Start(String),
    /// The topology names a process other than 0, which runs [`run_peer`], not an engine.
    NotLeader(usize),
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::WorkerStopped => {
                write!(f, "a dataflow worker stopped (a worker panicked or a cluster process was lost)")
            }
            EngineError::Start(e) => write!(f, "cannot start dataflow workers: {e}"),
            EngineError::NotLeader(p) => {
                write!(f, "process {p} of a cluster holds state only; process 0 runs the engine")
            }
        }
    }
}

impl std::error::Error for EngineError {}

/// Where the timely workers run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Topology {
    /// `workers` threads of this process (at least one).
    Local {
        /// Worker threads.
        workers: usize,
    },
    /// A timely cluster: `threads` workers in each process, one process per address (`host:port`,
    /// timely's hostfile order); this is process `process`. Process 0 feeds the input and
    /// receives the output.
    Cluster {
        /// Worker threads per process.
        threads: usize,
        /// This process's index in `addresses`.
        process: usize,
        /// Every process's address, process 0 first.
        addresses: Vec<String>,
    },
}

impl Topology {
    /// `workers` threads of this process.
    pub fn local(workers: usize) -> Self {
        Topology::Local { workers: workers.max(1) }
    }

    /// The number of processes.
    pub fn processes(&self) -> usize {
        match self {
            Topology::Local { .. } => 1,
            Topology::Cluster { addresses, .. } => addresses.len(),
        }
    }

    /// This process's index (0 for a local topology).
    pub fn process(&self) -> usize {
        match self {
            Topology::Local { .. } => 0,
            Topology::Cluster { process, .. } => *process,
        }
    }

    /// Worker threads in this process.
    pub fn threads(&self) -> usize {
        match self {
            Topology::Local { workers } => (*workers).max(1),
            Topology::Cluster { threads, .. } => (*threads).max(1),
        }
    }

    /// Workers over all processes.
    pub fn total_workers(&self) -> usize {
        self.threads() * self.processes()
    }

    fn config(&self) -> Result<timely::Config, EngineError> {
        let communication = match self {
            Topology::Local { workers } if *workers <= 1 => timely::CommunicationConfig::Thread,
            Topology::Local { workers } => timely::CommunicationConfig::Process(*workers),
            Topology::Cluster { threads, process, addresses } => {
                if addresses.is_empty() || *process >= addresses.len() {
                    return Err(EngineError::Start(format!(
                        "process {process} is not among the {} addresses of the cluster",
                        addresses.len()
                    )));
                }
                timely::CommunicationConfig::Cluster {
                    threads: (*threads).max(1),
                    process: *process,
                    addresses: addresses.clone(),
                    report: false,
                    zerocopy: false,
                }
            }
        };
        let mut worker = WorkerConfig::default();
        worker.set::<ExertionLogic>("differential/default_exert_logic".to_string(), Arc::new(finish_merges));
        Ok(timely::Config { communication, worker })
    }
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topology::Local { workers } => write!(f, "{workers} worker(s) in one process"),
            Topology::Cluster { threads, process, addresses } => {
                write!(f, "process {process} of {} × {threads} worker(s) ({})", addresses.len(), addresses.join(", "))
            }
        }
    }
}

/// What worker 0 is asked to do.
enum Command {
    /// Apply the changes of one time.
    Apply { time: Time, batch: Box<InputBatch> },
    /// Finish the merges in progress in this worker's arrangements, then report.
    Settle,
}

/// Worker 0's output for one time (every worker's output is exchanged to it).
struct Report {
    output: Vec<(Output, isize)>,
}

/// The ids of the small tables the engine holds rows of, so that ingest reads an owner, a
/// project or a taxon only the first time a batch refers to it. (Re-sending a known row is
/// harmless, an identical upsert changes nothing, so these sets only save reads.)
#[derive(Clone, Debug, Default)]
pub struct Known {
    /// `main_event` ids.
    pub events: IdSet<Id>,
    /// `main_deployment` ids.
    pub deployments: IdSet<Id>,
    /// `main_project` ids (a project's filter rows are read with it).
    pub projects: IdSet<Id>,
    /// `main_taxon` ids.
    pub taxa: IdSet<Id>,
}

impl Known {
    fn apply(&mut self, batch: &InputBatch) {
        fn track<R>(set: &mut IdSet<Id>, changes: &[(Id, Option<R>)]) {
            for (id, row) in changes {
                if row.is_some() {
                    set.insert(*id);
                } else {
                    set.remove(id);
                }
            }
        }
        track(&mut self.events, &batch.events);
        track(&mut self.deployments, &batch.deployments);
        track(&mut self.projects, &batch.projects);
        track(&mut self.taxa, &batch.taxa);
    }
}

/// The count engine: timely workers running the graph, and the current counts.
pub struct Engine {
    /// The current value of every output field (absent means 0 / NULL).
    values: Values,
    /// The time the next batch is applied at.
    time: Time,
    /// Ids of the small tables it holds.
    known: Known,
    /// Rows held by this process's workers (every table).
    rows: Arc<AtomicI64>,
    /// Commands to worker 0.
    commands: Option<Sender<Command>>,
    /// Worker 0's reports.
    reports: Receiver<Report>,
    /// Where the workers run.
    topology: Topology,
    /// The time of a batch submitted whose output has not been collected yet.
    in_flight: Option<Time>,
    /// Joins the worker threads on drop (after `commands` closes, worker 0 finishes its loop
    /// and the inputs close, so every worker of every process finishes the dataflow).
    guards: Option<timely::communication::WorkerGuards<()>>,
}

/// A batch handed to the workers by [`Engine::submit`], whose output [`Engine::collect`]
/// waits for.
#[derive(Debug)]
#[must_use = "collect the batch's output"]
pub struct Submitted {
    /// The batch's time; `None` when nothing was sent (an empty batch changes no count).
    time: Option<Time>,
}

impl Engine {
    /// Starts `workers` timely worker threads (at least one) in this process.
    pub fn new(workers: usize) -> Result<Self, EngineError> {
        Engine::start(Topology::local(workers))
    }

    /// Starts this process's workers of `topology`, which must be process 0. In a cluster this
    /// blocks until every other process has connected (timely retries each second).
    pub fn start(topology: Topology) -> Result<Self, EngineError> {
        if topology.process() != 0 {
            return Err(EngineError::NotLeader(topology.process()));
        }
        let (command_tx, command_rx) = channel::<Command>();
        let (report_tx, reports) = channel::<Report>();
        let leader = Arc::new(Mutex::new(Some((command_rx, report_tx))));
        let rows = Arc::new(AtomicI64::new(0));
        let guards = execute(&topology, Arc::clone(&rows), leader)?;
        Ok(Engine {
            values: Values::default(),
            time: 0,
            known: Known::default(),
            rows,
            commands: Some(command_tx),
            reports,
            topology,
            in_flight: None,
            guards: Some(guards),
        })
    }

    /// Applies one batch of row changes at the next time and returns the owners whose counts
    /// changed, with their new values.
    ///
    /// Within a batch, the last change of an id wins. An upsert of a row identical to the one
    /// held, or a delete of a row not held, changes nothing: replays are free.
    pub fn apply(&mut self, batch: &InputBatch) -> Result<CountChanges, EngineError> {
        let submitted = self.submit(batch)?;
        self.collect(submitted)
    }

    /// The first half of [`Engine::apply`]: hands `batch` to the workers at the next time and
    /// returns at once, while they compute. [`Engine::collect`] waits for its output. Applying
    /// or submitting another batch first collects this one's output (its changes are kept in
    /// the engine's values but not returned).
    pub fn submit(&mut self, batch: &InputBatch) -> Result<Submitted, EngineError> {
        if batch.is_empty() {
            return Ok(Submitted { time: None });
        }
        self.finish_in_flight()?;
        self.known.apply(batch);
        let time = self.send(batch.clone())?;
        Ok(Submitted { time: Some(time) })
    }

    /// The second half of [`Engine::apply`]: waits for the output of the batch `submitted`
    /// handed over and returns the owners whose counts changed, with their new values.
    pub fn collect(&mut self, submitted: Submitted) -> Result<CountChanges, EngineError> {
        if submitted.time.is_none() || submitted.time != self.in_flight {
            // Empty, or already collected by a later call (which kept its changes).
            return Ok(CountChanges::default());
        }
        let report = self.receive()?;
        Ok(self.fold(report))
    }

    /// Collects the output of a batch submitted and never collected, so that the next time's
    /// report is that time's.
    fn finish_in_flight(&mut self) -> Result<(), EngineError> {
        if self.in_flight.is_some() {
            let report = self.receive()?;
            self.fold(report);
        }
        Ok(())
    }

    /// Consolidates one time's output and folds it into the values.
    fn fold(&mut self, report: Vec<(Output, isize)>) -> CountChanges {
        let mut output: IdMap<Output, isize> = IdMap::default();
        for (record, diff) in report {
            *output.entry(record).or_insert(0) += diff;
        }
        output.retain(|_, diff| *diff != 0);
        self.absorb(output)
    }

    /// Advances every worker of every process by one empty dataflow time: `Ok` when they all
    /// took part, [`EngineError::WorkerStopped`] when a worker (in a cluster, a process) is
    /// gone. Changes no count. A cluster's process 0 calls it when idle, so that a lost
    /// process is noticed without waiting for the next batch.
    pub fn check(&mut self) -> Result<(), EngineError> {
        let report = self.step(InputBatch::default())?;
        debug_assert!(report.is_empty(), "an empty time changed counts");
        Ok(())
    }

    /// Waits until worker 0 has finished the merges its arrangements have begun, which it
    /// otherwise does on its own between batches. Changes no count; for measuring memory at
    /// rest. (In a cluster, the other processes' workers finish theirs on their own.)
    pub fn settle(&mut self) -> Result<(), EngineError> {
        self.finish_in_flight()?;
        let commands = self.commands.as_ref().ok_or(EngineError::WorkerStopped)?;
        commands.send(Command::Settle).map_err(|_| EngineError::WorkerStopped)?;
        self.reports.recv().map_err(|_| EngineError::WorkerStopped)?;
        Ok(())
    }

    /// Hands `batch` to worker 0 at the next time and waits for that time's output.
    fn step(&mut self, batch: InputBatch) -> Result<Vec<(Output, isize)>, EngineError> {
        self.finish_in_flight()?;
        self.send(batch)?;
        self.receive()
    }

    /// Hands `batch` to worker 0 at the next time, which it returns.
    fn send(&mut self, batch: InputBatch) -> Result<Time, EngineError> {
        let time = self.time;
        self.time += 1;
        let commands = self.commands.as_ref().ok_or(EngineError::WorkerStopped)?;
        commands.send(Command::Apply { time, batch: Box::new(batch) }).map_err(|_| EngineError::WorkerStopped)?;
        self.in_flight = Some(time);
        Ok(time)
    }

    /// Waits for the output of the time last sent.
    fn receive(&mut self) -> Result<Vec<(Output, isize)>, EngineError> {
        let report = self.reports.recv().map_err(|_| EngineError::WorkerStopped)?;
        self.in_flight = None;
        Ok(report.output)
    }

    /// Folds one time's consolidated output into `values` and reports the changed owners.
    fn absorb(&mut self, output: IdMap<Output, isize>) -> CountChanges {
        let touched: BTreeSet<Owner> = output.keys().map(|((owner, _field), _value)| *owner).collect();
        let before: Vec<OwnerCounts> = touched.iter().map(|owner| self.owner_counts(*owner)).collect();
        // Retractions first: a changed field retracts its old value and inserts the new one.
        for (((owner, field), value), diff) in &output {
            if *diff < 0 && self.values.get(*owner, *field) == Some(*value) {
                self.values.remove(*owner, *field);
            }
        }
        for (((owner, field), value), diff) in &output {
            if *diff > 0 {
                self.values.insert(*owner, *field, *value);
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
        let get = |field| self.values.get(owner, field);
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
        for owner in self.values.existing() {
            match self.owner_counts(owner) {
                OwnerCounts::Image(Some(c)) => {
                    all.images.insert(owner_id(owner), c);
                }
                OwnerCounts::Event(Some(c)) => {
                    all.events.insert(owner_id(owner), c);
                }
                OwnerCounts::Deployment(Some(c)) => {
                    all.deployments.insert(owner_id(owner), c);
                }
                _ => {}
            }
        }
        all
    }

    /// The ids of the events, deployments, projects and taxa it holds.
    pub fn known(&self) -> &Known {
        &self.known
    }

    /// Rows of every table held by this process's workers (in a cluster, the other processes
    /// hold the rest). Exact once `apply` has returned.
    pub fn rows(&self) -> i64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// The number of batches that changed something so far (the dataflow's current time).
    pub fn time(&self) -> Time {
        self.time
    }

    /// Worker threads in this process.
    pub fn workers(&self) -> usize {
        self.topology.threads()
    }

    /// Where the workers run.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the command channel ends worker 0's loop, which closes the inputs; every
        // worker (in every process) then finishes the dataflow and the guards join them.
        self.commands = None;
        if let Some(guards) = self.guards.take() {
            // `join`, not drop: dropping guards of a panicked worker panics.
            let _ = guards.join();
        }
    }
}

/// Runs process `topology.process()` (not 0) of a cluster until process 0 closes the inputs
/// (its engine is dropped) or the cluster breaks. Blocks; holds this process's share of the
/// state meanwhile. `Ok` when the cluster ended cleanly, [`EngineError::WorkerStopped`] when a
/// process was lost.
pub fn run_peer(topology: &Topology) -> Result<(), EngineError> {
    if topology.process() == 0 {
        return Err(EngineError::Start("process 0 runs the engine, not a peer".into()));
    }
    let rows = Arc::new(AtomicI64::new(0));
    let guards = execute(topology, rows, Arc::new(Mutex::new(None)))?;
    if guards.join().into_iter().all(|r| r.is_ok()) {
        Ok(())
    } else {
        Err(EngineError::WorkerStopped)
    }
}

/// The channels between the engine and worker 0 (taken by worker 0 of process 0).
type Leader = Arc<Mutex<Option<(Receiver<Command>, Sender<Report>)>>>;

/// Starts this process's workers of `topology`, each building the graph. Worker 0 of process 0
/// takes `leader` and serves commands; every other worker closes its inputs at once and steps
/// the dataflow until it completes (timely's `execute` does that after the closure returns).
fn execute(
    topology: &Topology,
    rows: Arc<AtomicI64>,
    leader: Leader,
) -> Result<timely::communication::WorkerGuards<()>, EngineError> {
    let config = topology.config()?;
    timely::execute(config, move |worker| {
        let output: Rc<RefCell<Vec<(Output, isize)>>> = Rc::new(RefCell::new(Vec::new()));
        let mut inputs = Inputs::new();
        let sink = Rc::clone(&output);
        let rows = Arc::clone(&rows);
        let probe = worker.dataflow::<Time, _, _>(|scope| {
            let (probe, _) = graph::build(scope, &mut inputs, rows)
                .inner
                .exchange(|_| 0)
                .inspect(move |(data, _time, diff)| sink.borrow_mut().push((*data, *diff)))
                .probe();
            probe
        });
        let channels = if worker.index() == 0 { leader.lock().ok().and_then(|mut l| l.take()) } else { None };
        let Some((commands, reports)) = channels else {
            // Not the feeding worker: dropping `inputs` closes them here.
            return;
        };
        loop {
            let command = match commands.try_recv() {
                Ok(command) => command,
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => {
                    // Idle: finish the merges arrangements have begun, then wait.
                    if has_work(worker) {
                        worker.step();
                        continue;
                    }
                    match commands.recv() {
                        Ok(command) => command,
                        Err(_) => return,
                    }
                }
            };
            let (time, batch) = match command {
                Command::Apply { time, batch } => (time, *batch),
                Command::Settle => {
                    while has_work(worker) {
                        worker.step();
                    }
                    if reports.send(Report { output: Vec::new() }).is_err() {
                        return;
                    }
                    continue;
                }
            };
            inputs.send(&batch, time);
            inputs.advance_to(time + 1);
            worker.step_while(|| probe.less_than(&(time + 1)));
            let output = std::mem::take(&mut *output.borrow_mut());
            if reports.send(Report { output }).is_err() {
                return;
            }
        }
    })
    .map_err(EngineError::Start)
}

/// The current value of every output field (absent means 0 / NULL).
///
/// Images are most owners (eight detections each on average) and have two fields, so they
/// get a map of their own, 24 bytes an image instead of two 32-byte `(owner, field)` entries.
#[derive(Default)]
struct Values {
    /// Per image: `[Exists, Detections]`, [`Values::ABSENT`] where a field has no value.
    images: IdMap<Id, [i64; 2]>,
    /// Every field of events and deployments.
    others: IdMap<(Owner, Field), i64>,
}

impl Values {
    /// No value. Counts are never negative and the timestamps are Postgres' (which cannot
    /// be `i64::MIN` microseconds), so no output value is ever this.
    const ABSENT: i64 = i64::MIN;

    /// Where an image field sits in its pair, if it is one of an image's two.
    fn image_slot(field: Field) -> Option<usize> {
        match field {
            Field::Exists => Some(0),
            Field::Detections => Some(1),
            _ => None,
        }
    }

    fn get(&self, owner: Owner, field: Field) -> Option<i64> {
        match (owner, Self::image_slot(field)) {
            (Owner::Image(id), Some(slot)) => {
                self.images.get(&id).map(|pair| pair[slot]).filter(|v| *v != Self::ABSENT)
            }
            _ => self.others.get(&(owner, field)).copied(),
        }
    }

    fn insert(&mut self, owner: Owner, field: Field, value: i64) {
        match (owner, Self::image_slot(field)) {
            (Owner::Image(id), Some(slot)) => {
                self.images.entry(id).or_insert([Self::ABSENT; 2])[slot] = value;
            }
            _ => {
                self.others.insert((owner, field), value);
            }
        }
    }

    fn remove(&mut self, owner: Owner, field: Field) {
        match (owner, Self::image_slot(field)) {
            (Owner::Image(id), Some(slot)) => {
                if let Some(pair) = self.images.get_mut(&id) {
                    pair[slot] = Self::ABSENT;
                    if *pair == [Self::ABSENT; 2] {
                        self.images.remove(&id);
                    }
                }
            }
            _ => {
                self.others.remove(&(owner, field));
            }
        }
    }

    /// The owners whose `Exists` field is set.
    fn existing(&self) -> impl Iterator<Item = Owner> + '_ {
        let images = self.images.iter().filter(|(_, pair)| pair[0] != Self::ABSENT).map(|(id, _)| Owner::Image(*id));
        let others = self.others.keys().filter(|(_, field)| *field == Field::Exists).map(|(owner, _)| *owner);
        images.chain(others)
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

/// The other processes of a [`loopback`] cluster, as threads of this process.
pub struct Peers {
    threads: Vec<std::thread::JoinHandle<Result<(), EngineError>>>,
}

impl Peers {
    /// Waits for every peer to finish (after the engine is dropped); the first error, if any.
    pub fn join(self) -> Result<(), EngineError> {
        let mut result = Ok(());
        for thread in self.threads {
            let outcome = thread.join().unwrap_or(Err(EngineError::WorkerStopped));
            if result.is_ok() {
                result = outcome;
            }
        }
        result
    }
}

/// `processes` distinct free `127.0.0.1:port` addresses for a loopback cluster: the ports are
/// held together while the OS picks them, then released for timely to bind.
pub fn loopback_addresses(processes: usize) -> Result<Vec<String>, EngineError> {
    let listeners = (0..processes)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EngineError::Start(format!("cannot pick a loopback port: {e}")))?;
    listeners
        .iter()
        .map(|l| {
            let port = l.local_addr().map_err(|e| EngineError::Start(e.to_string()))?.port();
            Ok(format!("127.0.0.1:{port}"))
        })
        .collect()
}

/// A timely cluster of `processes` processes with `threads` workers each, all inside this OS
/// process and talking over TCP on 127.0.0.1 (free ports picked by the OS), as the tests and
/// benchmarks run one. Returns process 0's engine and the other processes, which end when
/// the engine is dropped.
pub fn loopback(processes: usize, threads: usize) -> Result<(Engine, Peers), EngineError> {
    let processes = processes.max(1);
    let addresses = loopback_addresses(processes)?;
    let topology = |process| Topology::Cluster { threads, process, addresses: addresses.clone() };
    let threads = (1..processes)
        .map(|process| {
            let topology = topology(process);
            std::thread::spawn(move || run_peer(&topology))
        })
        .collect();
    let engine = Engine::start(topology(0))?;
    Ok((engine, Peers { threads }))
}

/// Whether an operator of `worker` asked to be scheduled (an arrangement with a merge to
/// finish, once the last batch's output is out).
fn has_work(worker: &timely::worker::Worker) -> bool {
    worker.activations().borrow().empty_for() == Some(Duration::ZERO)
}

/// Merge effort an arrangement spends per activation while one of its merges is in progress.
const IDLE_MERGE_EFFORT: usize = 100_000;

/// The arrangements' exertion logic: keep working while a merge is in progress (a spine
/// level holds two batches), so that the inputs of a merge, and the output being built, do
/// not stay in memory side by side until new updates happen to supply the fuel. It never
/// starts a merge the spine would not have started: single batches stay as they are.
fn finish_merges(levels: &[(usize, usize, usize)]) -> Option<usize> {
    levels.iter().any(|(_level, batches, _length)| *batches > 1).then_some(IDLE_MERGE_EFFORT)
}
