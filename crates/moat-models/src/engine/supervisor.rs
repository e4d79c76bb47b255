//! The runner's side of the workers: it starts one worker process per
//! loaded model, routes requests to it and events back, and watches it.
//! A worker that dies fails only the requests it had in flight (503, with
//! how it died); the next request for that model starts a new one. Idle
//! workers are unloaded after their keep-alive, and a model that would not
//! fit in the memory budget is refused before it is loaded.

use std::collections::HashMap;
use std::io::BufWriter;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::protocol::{
    read_frame, write_frame, FromWorker, Generate, LoadSpec, Loaded, PromptCacheSpec, ToWorker,
};
use super::worker::ROLE;
use super::EngineError;

/// How the runner runs its workers.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The `moat` binary, re-executed as a worker.
    pub worker_exe: PathBuf,
    /// Where each model's log (the worker's standard error) is written.
    pub log_dir: PathBuf,
    pub threads: i32,
    pub slots: u32,
    pub batch: u32,
    pub ubatch: u32,
    /// Context when neither `configure`, the package nor a request says.
    pub default_context: u32,
    /// `None`: keep loaded models forever.
    pub keep_alive: Option<Duration>,
    /// Bytes all loaded models may take together.
    pub memory_budget: u64,
    /// The file workers lock while they decode, so that busy models take
    /// turns on the cores instead of fighting over them.
    pub cores_lock: Option<PathBuf>,
    /// The prompt cache on disk (its folder and bound); `None`: none.
    pub prompt_cache: Option<(PathBuf, u64)>,
}

impl RunnerConfig {
    /// Defaults for this machine: threads = physical cores (llama.cpp is
    /// several times slower with one thread per hyper-thread), four slots,
    /// llama-server's batch sizes, 4096 tokens of context, five minutes of
    /// keep-alive, and three quarters of the memory.
    pub fn for_host(worker_exe: PathBuf, log_dir: PathBuf) -> Self {
        RunnerConfig {
            worker_exe,
            log_dir: log_dir.clone(),
            threads: physical_cores() as i32,
            slots: 4,
            batch: 2048,
            ubatch: 512,
            default_context: 4096,
            keep_alive: Some(Duration::from_secs(300)),
            memory_budget: total_memory() / 4 * 3,
            cores_lock: Some(log_dir.join(".cores.lock")),
            prompt_cache: None,
        }
    }
}

/// What the runner needs to know of a model to load it.
#[derive(Debug, Clone)]
pub struct ModelToLoad {
    pub id: String,
    pub name: String,
    /// Shards in order; a single file for most models.
    pub gguf: Vec<PathBuf>,
    /// Context from `configure` or the package, if either set one.
    pub context_size: Option<u32>,
    /// The model's own trained context, if its header says.
    pub context_train: Option<u32>,
    /// Estimated bytes: weights plus a KV cache of the chosen context.
    pub weights_bytes: u64,
    pub kv_bytes_per_token: u64,
}

/// A loaded model as `ps` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadedModel {
    pub id: String,
    pub name: String,
    pub pid: u32,
    pub context_size: u32,
    pub memory: u64,
    pub in_flight: usize,
    pub last_used: SystemTime,
    pub keep_alive: Option<Duration>,
    pub load_ms: f64,
}

pub struct Runner {
    config: RunnerConfig,
    workers: Mutex<HashMap<String, Arc<Worker>>>,
    /// Held while a worker starts, so that two requests do not load a
    /// model twice.
    loading: Mutex<()>,
    next_id: AtomicU64,
}

pub struct Worker {
    pub model: ModelToLoad,
    pub loaded: Loaded,
    pub memory: u64,
    keep_alive: Mutex<Option<Duration>>,
    pid: u32,
    to_worker: Mutex<BufWriter<UnixStream>>,
    pending: Mutex<HashMap<u64, UnboundedSender<FromWorker>>>,
    last_used: Mutex<(Instant, SystemTime)>,
    child: Mutex<Child>,
    dead: AtomicBool,
    /// Set when the runner unloads it, so that its end is not a crash.
    stopping: AtomicBool,
    runner: Weak<Runner>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runner {
    pub fn new(config: RunnerConfig) -> Arc<Runner> {
        let runner = Arc::new(Runner {
            config,
            workers: Mutex::new(HashMap::new()),
            loading: Mutex::new(()),
            next_id: AtomicU64::new(1),
        });
        let weak = Arc::downgrade(&runner);
        std::thread::spawn(move || reap_idle(weak));
        runner
    }

    pub fn config(&self) -> &RunnerConfig {
        &self.config
    }

    /// The worker serving `model`, started if it is not running.
    pub fn worker(
        self: &Arc<Self>,
        model: &ModelToLoad,
        keep_alive: Option<Option<Duration>>,
    ) -> Result<Arc<Worker>, EngineError> {
        // A request's keep-alive (Ollama's, DMR's) applies to a model that
        // is already loaded too, from this request on.
        let keep = |w: &Worker| {
            if let Some(k) = keep_alive {
                *lock(&w.keep_alive) = k;
            }
        };
        if let Some(w) = self.running(&model.id) {
            keep(&w);
            w.touch();
            return Ok(w);
        }
        let _loading = lock(&self.loading);
        if let Some(w) = self.running(&model.id) {
            keep(&w);
            return Ok(w);
        }
        let context = self.context_for(model);
        // The slots share one cache of the context.
        let memory = model.weights_bytes + model.kv_bytes_per_token * u64::from(context);
        self.make_room(model, memory)?;
        let worker = self.start(
            model,
            context,
            memory,
            keep_alive.unwrap_or(self.config.keep_alive),
        )?;
        lock(&self.workers).insert(model.id.clone(), worker.clone());
        Ok(worker)
    }

    /// The live worker of model `id`, if it runs; a request's keep-alive,
    /// when given, applies to it from now on.
    pub fn running_worker(
        &self,
        id: &str,
        keep_alive: Option<Option<Duration>>,
    ) -> Option<Arc<Worker>> {
        let w = self.running(id)?;
        if let Some(k) = keep_alive {
            *lock(&w.keep_alive) = k;
        }
        w.touch();
        Some(w)
    }

    fn running(&self, id: &str) -> Option<Arc<Worker>> {
        lock(&self.workers)
            .get(id)
            .filter(|w| !w.dead.load(Ordering::SeqCst))
            .cloned()
    }

    /// The context `model` is (or would be) loaded with.
    pub fn context_for(&self, model: &ModelToLoad) -> u32 {
        let wanted = model.context_size.unwrap_or(self.config.default_context);
        match model.context_train {
            // A configured size is taken as asked; the default never goes
            // past what the model was trained for.
            Some(train) if model.context_size.is_none() => wanted.min(train).max(256),
            _ => wanted.max(256),
        }
    }

    /// Unload idle models (least recently used first) until `memory` fits;
    /// refuse with the numbers when it cannot.
    fn make_room(&self, model: &ModelToLoad, memory: u64) -> Result<(), EngineError> {
        loop {
            let workers: Vec<Arc<Worker>> = lock(&self.workers).values().cloned().collect();
            let used: u64 = workers.iter().map(|w| w.memory).sum();
            if used + memory <= self.config.memory_budget {
                return Ok(());
            }
            let idle = workers
                .iter()
                .filter(|w| lock(&w.pending).is_empty())
                .min_by_key(|w| lock(&w.last_used).0);
            match idle {
                Some(w) => self.unload_worker(w),
                None => {
                    let loaded = workers
                        .iter()
                        .map(|w| format!("{} {}", w.model.name, mib(w.memory)))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(EngineError::NoMemory(format!(
                        "{} needs about {} (weights {} + context cache {}), but the model runner's memory budget of {} has {} free (loaded and busy: {loaded}); unload a model with `moat model unload` or wait for it to finish",
                        model.name,
                        mib(memory),
                        mib(model.weights_bytes),
                        mib(memory - model.weights_bytes),
                        mib(self.config.memory_budget),
                        mib(self.config.memory_budget.saturating_sub(used)),
                    )));
                }
            }
        }
    }

    fn start(
        self: &Arc<Self>,
        model: &ModelToLoad,
        context: u32,
        memory: u64,
        keep_alive: Option<Duration>,
    ) -> Result<Arc<Worker>, EngineError> {
        let gguf = self.first_shard(model)?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| EngineError::io("a socket pair", e))?;
        std::fs::create_dir_all(&self.config.log_dir)
            .map_err(|e| EngineError::io("the model log directory", e))?;
        let log_path = self.log_path(&model.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| EngineError::io(format!("{}", log_path.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| EngineError::io("the model log", e))?;
        let child = Command::new(&self.config.worker_exe)
            .arg(ROLE)
            .arg(&model.name)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .map_err(|e| EngineError::io("start a model worker", e))?;
        let pid = child.id();
        let mut reader = ours
            .try_clone()
            .map_err(|e| EngineError::io("the worker socket", e))?;
        let mut writer = BufWriter::new(ours);
        let spec = LoadSpec {
            gguf,
            context_size: context,
            slots: self.config.slots,
            threads: self.config.threads,
            batch: self.config.batch,
            ubatch: self.config.ubatch,
            // Workers only fight over the cores when each takes over half.
            cores_lock: self
                .config
                .cores_lock
                .clone()
                .filter(|_| self.config.threads.max(1) as usize * 2 > physical_cores()),
            prompt_cache: self.config.prompt_cache.as_ref().map(|(root, max_bytes)| {
                PromptCacheSpec {
                    root: root.clone(),
                    max_bytes: *max_bytes,
                    model: model.id.clone(),
                }
            }),
        };
        let mut child = child;
        let fail = |child: &mut Child, why: String| {
            let _ = child.kill();
            let status = child.wait().ok();
            EngineError::Load(match status {
                Some(s) if !s.success() && why.is_empty() => {
                    format!("the worker for {} {}", model.name, describe_exit(s))
                }
                _ => why,
            })
        };
        if let Err(e) = write_frame(&mut writer, &ToWorker::Load(spec)) {
            return Err(fail(
                &mut child,
                format!("the worker for {} did not take its model: {e}", model.name),
            ));
        }
        let loaded = match read_frame::<FromWorker>(&mut reader) {
            Ok(Some(FromWorker::Loaded(l))) => l,
            Ok(Some(FromWorker::LoadFailed { error })) => return Err(fail(&mut child, error)),
            Ok(_) | Err(_) => {
                return Err(fail(&mut child, String::new()));
            }
        };
        tracing::info!(model = %model.name, pid, load_ms = loaded.load_ms, "model loaded");
        let worker = Arc::new(Worker {
            model: model.clone(),
            loaded,
            memory,
            keep_alive: Mutex::new(keep_alive),
            pid,
            to_worker: Mutex::new(writer),
            pending: Mutex::new(HashMap::new()),
            last_used: Mutex::new((Instant::now(), SystemTime::now())),
            child: Mutex::new(child),
            dead: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            runner: Arc::downgrade(self),
        });
        let w = worker.clone();
        std::thread::spawn(move || w.route_events(reader));
        Ok(worker)
    }

    /// The file llama.cpp opens. A split model's blobs are named by their
    /// digests, but llama.cpp finds the shards after the first by the
    /// split naming scheme (`PREFIX-00002-of-00003.gguf`), so they are
    /// linked under such names, side by side.
    fn first_shard(&self, model: &ModelToLoad) -> Result<PathBuf, EngineError> {
        match model.gguf.as_slice() {
            [] => Err(EngineError::Load(format!(
                "{} has no GGUF file",
                model.name
            ))),
            [one] => Ok(one.clone()),
            shards => {
                let id: String = model.id.chars().filter(char::is_ascii_hexdigit).collect();
                let dir = self.config.log_dir.join("shards").join(id);
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| EngineError::io("the shard folder", e))?;
                let n = shards.len();
                for (i, blob) in shards.iter().enumerate() {
                    let link = dir.join(format!("model-{:05}-of-{n:05}.gguf", i + 1));
                    std::os::unix::fs::symlink(blob, &link)
                        .map_err(|e| EngineError::io(format!("link {}", link.display()), e))?;
                }
                Ok(dir.join(format!("model-00001-of-{n:05}.gguf")))
            }
        }
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        let file: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.config.log_dir.join(format!("{file}.log"))
    }

    pub fn log_dir(&self) -> &Path {
        &self.config.log_dir
    }

    pub fn loaded(&self) -> Vec<LoadedModel> {
        let mut out: Vec<LoadedModel> = lock(&self.workers)
            .values()
            .map(|w| LoadedModel {
                id: w.model.id.clone(),
                name: w.model.name.clone(),
                pid: w.pid,
                context_size: w.loaded.context_size,
                memory: w.memory,
                in_flight: lock(&w.pending).len(),
                last_used: lock(&w.last_used).1,
                keep_alive: *lock(&w.keep_alive),
                load_ms: w.loaded.load_ms,
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Unload the models whose id is in `ids` (all when `None`); returns
    /// how many were unloaded.
    pub fn unload(&self, ids: Option<&[String]>) -> usize {
        let victims: Vec<Arc<Worker>> = lock(&self.workers)
            .values()
            .filter(|w| ids.is_none_or(|ids| ids.contains(&w.model.id)))
            .cloned()
            .collect();
        for w in &victims {
            self.unload_worker(w);
        }
        victims.len()
    }

    fn unload_worker(&self, w: &Arc<Worker>) {
        lock(&self.workers).retain(|_, x| !Arc::ptr_eq(x, w));
        w.stop();
    }

    fn forget(&self, w: &Worker) {
        lock(&self.workers).retain(|_, x| !std::ptr::eq(Arc::as_ptr(x), w));
    }
}

impl Worker {
    fn touch(&self) {
        *lock(&self.last_used) = (Instant::now(), SystemTime::now());
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Send a request; its events arrive on the receiver. Dropping the
    /// returned [`Request`] before it is done cancels it in the worker.
    pub fn generate(self: &Arc<Self>, mut g: Generate) -> Result<Request, EngineError> {
        let id = self.new_id();
        g.id = id;
        self.send(id, ToWorker::Generate(g))
    }

    pub fn tokenize(self: &Arc<Self>, text: String, special: bool) -> Result<Request, EngineError> {
        let id = self.new_id();
        self.send(id, ToWorker::Tokenize { id, text, special })
    }

    pub fn embed(self: &Arc<Self>, inputs: Vec<String>) -> Result<Request, EngineError> {
        let id = self.new_id();
        self.send(id, ToWorker::Embed { id, inputs })
    }

    fn new_id(&self) -> u64 {
        self.runner
            .upgrade()
            .map_or(0, |r| r.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn send(self: &Arc<Self>, id: u64, msg: ToWorker) -> Result<Request, EngineError> {
        let (tx, rx) = unbounded_channel();
        self.touch();
        lock(&self.pending).insert(id, tx);
        let sent = write_frame(&mut *lock(&self.to_worker), &msg);
        if sent.is_err() || self.dead.load(Ordering::SeqCst) {
            lock(&self.pending).remove(&id);
            return Err(EngineError::WorkerGone(format!(
                "the worker for {} is not running; retry",
                self.model.name
            )));
        }
        Ok(Request {
            id,
            events: rx,
            worker: self.clone(),
            done: false,
        })
    }

    /// Read the worker's events and hand each to its request; when the
    /// worker dies, fail every request it had and forget it.
    fn route_events(self: Arc<Self>, mut reader: UnixStream) {
        while let Ok(Some(ev)) = read_frame::<FromWorker>(&mut reader) {
            let (id, last) = match &ev {
                FromWorker::Piece { id, .. } => (*id, false),
                FromWorker::Done { id, .. }
                | FromWorker::Failed { id, .. }
                | FromWorker::Tokens { id, .. }
                | FromWorker::Embeddings { id, .. } => (*id, true),
                FromWorker::Loaded(_) | FromWorker::LoadFailed { .. } => continue,
            };
            let mut pending = lock(&self.pending);
            let tx = if last {
                pending.remove(&id)
            } else {
                pending.get(&id).cloned()
            };
            drop(pending);
            if last {
                self.touch();
            }
            if let Some(tx) = tx {
                let _ = tx.send(ev);
            }
        }
        self.dead.store(true, Ordering::SeqCst);
        let how = if self.stopping.load(Ordering::SeqCst) {
            // `stop` closed the socket: it waits for the worker, which
            // saves its prompt cache before it exits.
            "was unloaded".to_string()
        } else {
            let mut child = lock(&self.child);
            match child.try_wait() {
                Ok(Some(s)) => describe_exit(s),
                _ => {
                    // The socket broke but the process lives: end it.
                    let _ = child.kill();
                    child
                        .wait()
                        .map(describe_exit)
                        .unwrap_or_else(|_| "stopped".into())
                }
            }
        };
        if !self.stopping.load(Ordering::SeqCst) {
            tracing::warn!(model = %self.model.name, "model worker {how}");
        }
        let error = format!(
            "the model worker for {} {how}; the request was lost, retry it (the next request starts the worker again; see `moat model logs {}`)",
            self.model.name, self.model.name
        );
        for (id, tx) in lock(&self.pending).drain() {
            let _ = tx.send(FromWorker::Failed {
                id,
                status: 503,
                error: error.clone(),
            });
        }
        if let Some(r) = self.runner.upgrade() {
            r.forget(&self);
        }
    }

    /// Stop the worker: closing its socket ends its loop, and it saves
    /// its prompt cache before it exits, so it gets time for that (the
    /// next worker of the model then finds it); a worker stuck in
    /// llama.cpp, or in a save on a disk that hangs, is killed.
    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = lock(&self.to_worker)
            .get_ref()
            .shutdown(std::net::Shutdown::Both);
        let mut child = lock(&self.child);
        let grace = if self
            .runner
            .upgrade()
            .is_some_and(|r| r.config.prompt_cache.is_some())
        {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(1)
        };
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn idle_for(&self) -> Option<Duration> {
        if !lock(&self.pending).is_empty() {
            return None;
        }
        Some(lock(&self.last_used).0.elapsed())
    }
}

/// One request in flight. Dropped early (a client that went away), it
/// cancels the work in the worker, which frees the slot at once.
pub struct Request {
    id: u64,
    events: UnboundedReceiver<FromWorker>,
    worker: Arc<Worker>,
    done: bool,
}

impl Request {
    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<FromWorker> {
        if self.done {
            return None;
        }
        let ev = self.events.recv().await;
        match &ev {
            None | Some(FromWorker::Done { .. }) | Some(FromWorker::Failed { .. }) => {
                self.done = true
            }
            Some(FromWorker::Tokens { .. }) | Some(FromWorker::Embeddings { .. }) => {
                self.done = true
            }
            _ => {}
        }
        ev
    }

    /// Every event until the last, for callers that do not stream.
    pub fn blocking_next(&mut self) -> Option<FromWorker> {
        if self.done {
            return None;
        }
        let ev = self.events.blocking_recv();
        if !matches!(ev, Some(FromWorker::Piece { .. })) {
            self.done = true;
        }
        ev
    }

    pub fn worker(&self) -> &Arc<Worker> {
        &self.worker
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if !self.done && lock(&self.worker.pending).remove(&self.id).is_some() {
            let _ = write_frame(
                &mut *lock(&self.worker.to_worker),
                &ToWorker::Cancel { id: self.id },
            );
        }
    }
}

/// Unload workers that have been idle longer than their keep-alive.
fn reap_idle(runner: Weak<Runner>) {
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let Some(r) = runner.upgrade() else { return };
        let idle: Vec<Arc<Worker>> = lock(&r.workers)
            .values()
            .filter(|w| match (*lock(&w.keep_alive), w.idle_for()) {
                (Some(keep), Some(idle)) => idle >= keep,
                _ => false,
            })
            .cloned()
            .collect();
        for w in idle {
            // An unload before it may have taken long (a worker saving its
            // prompt cache): this one may have had requests since.
            let still_idle = match (*lock(&w.keep_alive), w.idle_for()) {
                (Some(keep), Some(idle)) => idle >= keep,
                _ => false,
            };
            if !still_idle {
                continue;
            }
            tracing::info!(model = %w.model.name, "unloading idle model");
            r.unload_worker(&w);
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        (Some(code), _) => format!("exited with status {code}"),
        _ => "stopped".into(),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Physical cores (not hyper-threads): distinct (package, core) pairs.
pub fn physical_cores() -> usize {
    let mut cores = std::collections::HashSet::new();
    if let Ok(text) = std::fs::read_to_string("/proc/cpuinfo") {
        let (mut phys, mut core) = (String::new(), String::new());
        for line in text.lines() {
            let mut kv = line.splitn(2, ':').map(str::trim);
            match (kv.next(), kv.next()) {
                (Some("physical id"), Some(v)) => phys = v.to_string(),
                (Some("core id"), Some(v)) => core = v.to_string(),
                (Some(""), None) | (None, _) => {}
                _ => {}
            }
            if line.trim().is_empty() && !core.is_empty() {
                cores.insert((std::mem::take(&mut phys), std::mem::take(&mut core)));
            }
        }
        if !core.is_empty() {
            cores.insert((phys, core));
        }
    }
    let online = std::thread::available_parallelism().map_or(1, |n| n.get());
    // Within a cgroup or affinity mask, fewer CPUs may be ours.
    match cores.len() {
        0 => online,
        n => n.min(online),
    }
}

fn total_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(8 << 30, |kb| kb * 1024)
}
