//! Data-parallel training over several devices with Burn's collective (feature
//! `collective`): [`run_training_ddp`].
//!
//! One worker thread per device, each with its own replica of the model and its own AdamW.
//! Replicas start from the same weights (one model built and materialised, or loaded, then
//! copied to each device with its parameter ids kept, which is what
//! `GradientsParams::all_reduce` needs to pair gradients up; Burn's parameters are lazy, and
//! a copy of an unmaterialised one would draw its own random values). Every optimizer
//! step, the replicas first sum their loss unit counts (text targets, images), then each
//! computes the gradient of its share of the step's objective (its sums divided by the
//! global counts), and Burn's collective sums those before global-norm clipping and AdamW,
//! so replicas take identical updates and stay identical.
//!
//! Data: every replica runs the same deterministic pipeline and trains on the micro-batches
//! whose index is its rank modulo the number of replicas (the others are packed and
//! dropped, so the data work is repeated on each replica; tensors are only built for the
//! replica's own batches). `N` replicas with `grad_accum = a` therefore see exactly the
//! batches of one device with `grad_accum = N * a`, the checkpoint's data position is the
//! same for every replica, and a run can be resumed with another number of devices.
//!
//! Rank 0 logs, evaluates, writes previews and checkpoints (the other replicas wait for it
//! in the next all-reduce). Besides the gradients, one small tensor is all-reduced per step:
//! the replicas' losses, finiteness, token and image counts, rank 0's stop request (time
//! budget) and which parameters got a gradient (plus the unit counts before the step), so that every replica all-reduces the same
//! set of gradients (a replica whose micro-batches hold no image has no gradient for the
//! image-only parameters; it contributes zeros, as a micro-batch without images does in
//! gradient accumulation).
//!
//! Several machines: Burn 0.21's global collective. Each machine runs one process with its
//! local devices; a global orchestrator (`transfusion-train orchestrator --port P`) pairs
//! the processes up, and each process serves its gradients to the others on a data port
//! (see [`MultiNode`] and the README).

use std::sync::Mutex;

use burn::collective::{
    all_reduce, finish_collective, register, reset_collective, CollectiveConfig, PeerId,
    ReduceOperation,
};
use burn::module::AutodiffModule;
use burn::module::{ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::TensorPrimitive;

use crate::config::ExperimentConfig;
use crate::engine::{prepare, train_loop, EngineHooks, LocalStep, RunOptions, StepSync};
use crate::error::{Result, TrainError};
use crate::transfusion::{RunSummary, TrainHooks, TransfusionTask};

/// The multi-node part of a data-parallel run (Burn's global collective). Every node must
/// use the same number of local devices and the same `num_nodes` and orchestrator.
#[derive(Clone, Debug)]
pub struct MultiNode {
    /// How many processes (machines) take part.
    pub num_nodes: u32,
    /// This node's index `0..num_nodes`: its replicas have global ranks
    /// `node_rank * devices .. (node_rank + 1) * devices`; node 0 writes the checkpoints.
    pub node_rank: u32,
    /// The global orchestrator, `ws://HOST:PORT`.
    pub orchestrator: String,
    /// Where the other nodes reach this node's tensor data service, `ws://THIS_HOST:PORT`
    /// (the port must be `data_port`).
    pub node_address: String,
    /// The port this node serves its tensors on (bound on 0.0.0.0).
    pub data_port: u16,
}

/// Serialises data-parallel runs in one process: Burn's local collective server is one per
/// backend type and process, so two runs at once (tests) would share it.
static COLLECTIVE_LOCK: Mutex<()> = Mutex::new(());

/// Trains `cfg` data-parallel over `devices` (one replica per device, this thread running
/// rank 0 with `hooks`). With `multi_node`, this process is one node of a multi-machine run.
/// Without it, `devices.len()` replicas; a single device works too (then it equals
/// [`crate::run_training`] up to floating-point rounding).
pub fn run_training_ddp<B: AutodiffBackend>(
    cfg: &ExperimentConfig,
    opts: &RunOptions,
    hooks: &mut TrainHooks<B>,
    devices: &[B::Device],
    multi_node: Option<&MultiNode>,
) -> Result<RunSummary> {
    if devices.is_empty() {
        return Err(TrainError::Setting("--devices: no device given".into()));
    }
    let _guard = COLLECTIVE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let local = devices.len();
    let mut config = CollectiveConfig::default().with_num_devices(local);
    let (world, first_rank) = match multi_node {
        None => (local, 0),
        Some(mn) => {
            if mn.node_rank >= mn.num_nodes {
                return Err(TrainError::Setting(format!(
                    "node rank {} is not below the number of nodes {}",
                    mn.node_rank, mn.num_nodes
                )));
            }
            for (what, a) in [
                ("orchestrator", &mn.orchestrator),
                ("node address", &mn.node_address),
            ] {
                if !a.starts_with("ws://") {
                    return Err(TrainError::Setting(format!(
                        "{what} `{a}` must be a WebSocket address ws://HOST:PORT"
                    )));
                }
            }
            config = config
                .with_num_nodes(mn.num_nodes)
                .with_global_address(
                    mn.orchestrator
                        .parse()
                        .map_err(|e| bad_address(&mn.orchestrator, e))?,
                )
                .with_node_address(
                    mn.node_address
                        .parse()
                        .map_err(|e| bad_address(&mn.node_address, e))?,
                )
                .with_data_service_port(mn.data_port);
            (local * mn.num_nodes as usize, local * mn.node_rank as usize)
        }
    };
    // Only global rank 0 writes to the run directory; other nodes still need the
    // checkpoint to resume from (a shared filesystem, or a copy of OUT/checkpoints).
    let (preview, mut engine_hooks) = hooks.split();
    let mut lead_task = TransfusionTask::<B>::new(cfg, opts, &devices[0], preview)?;
    let prepared = prepare(&mut lead_task, opts, &devices[0])?;
    let replicas: Vec<_> = devices[1..]
        .iter()
        .map(|d| prepared.replica_on(d))
        .collect();
    let lead = first_rank == 0;
    std::thread::scope(|s| {
        let workers: Vec<_> = replicas
            .into_iter()
            .zip(&devices[1..])
            .enumerate()
            .map(|(i, (p, device))| {
                let rank = first_rank + i + 1;
                let config = config.clone();
                let mut opts = opts.clone();
                opts.progress = false;
                s.spawn(move || {
                    let run = || {
                        let mut task = TransfusionTask::<B>::new(cfg, &opts, device, None)?;
                        let mut sync = CollectiveSync::<B>::register(rank, world, device, config)?;
                        let r = train_loop(
                            &mut task,
                            &opts,
                            &mut EngineHooks::default(),
                            device,
                            p,
                            &mut sync,
                        );
                        sync.finish(r.is_ok());
                        r
                    };
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                        .unwrap_or_else(|_| {
                            Err(TrainError::Collective(format!("replica {rank} panicked")))
                        });
                    if r.is_err() {
                        // Wake the other replicas up from a pending all-reduce.
                        reset_collective::<B::InnerBackend>();
                    }
                    r
                })
            })
            .collect();
        let mut own_opts = opts.clone();
        own_opts.progress &= lead;
        let mut no_hooks = EngineHooks::default();
        let own_hooks = if lead {
            &mut engine_hooks
        } else {
            &mut no_hooks
        };
        let r0 = (|| {
            let mut sync = CollectiveSync::<B>::register(first_rank, world, &devices[0], config)?;
            let r = train_loop(
                &mut lead_task,
                &own_opts,
                own_hooks,
                &devices[0],
                prepared,
                &mut sync,
            );
            sync.finish(r.is_ok());
            r
        })();
        if r0.is_err() {
            reset_collective::<B::InnerBackend>();
        }
        let mut first_err = None;
        for (i, w) in workers.into_iter().enumerate() {
            let r = w.join().unwrap_or_else(|_| {
                Err(TrainError::Collective(format!(
                    "replica {} panicked",
                    first_rank + i + 1
                )))
            });
            if let Err(e) = r {
                first_err.get_or_insert(e.within(format!("replica {}", first_rank + i + 1)));
            }
        }
        match (r0, first_err) {
            (Err(e), _) => Err(e.within(format!("replica {first_rank}"))),
            (Ok(_), Some(e)) => Err(e),
            (Ok(s), None) => Ok(s),
        }
    })
}

/// A replica's [`StepSync`] over Burn's collective.
pub struct CollectiveSync<B: AutodiffBackend> {
    rank: usize,
    world: usize,
    peer: PeerId,
    device: B::Device,
    finished: bool,
}

impl<B: AutodiffBackend> CollectiveSync<B> {
    /// Registers this replica (global rank `rank` of `world`) with the collective; returns
    /// once every local replica has registered (and, multi-node, every node).
    pub fn register(
        rank: usize,
        world: usize,
        device: &B::Device,
        config: CollectiveConfig,
    ) -> Result<Self> {
        let peer = PeerId::from(rank);
        register::<B::InnerBackend>(peer, device.clone(), config).map_err(|e| {
            TrainError::Collective(format!("collective register of replica {rank}: {e:?}"))
        })?;
        Ok(Self {
            rank,
            world,
            peer,
            device: device.clone(),
            finished: false,
        })
    }

    /// Leaves the collective (after a normal end) or resets it (after an error, so the
    /// other replicas do not wait forever).
    pub fn finish(&mut self, ok: bool) {
        if self.finished {
            return;
        }
        self.finished = true;
        if ok {
            if let Err(e) = finish_collective::<B::InnerBackend>(self.peer) {
                eprintln!("replica {}: leaving the collective: {e:?}", self.rank);
            }
        } else {
            reset_collective::<B::InnerBackend>();
        }
    }

    fn all_reduce_floats(&self, v: Vec<f32>, op: ReduceOperation) -> Result<Vec<f32>> {
        let n = v.len();
        let t = Tensor::<B::InnerBackend, 1>::from_data(TensorData::new(v, [n]), &self.device);
        let r = all_reduce::<B::InnerBackend>(self.peer, t.into_primitive().tensor(), op).map_err(
            |e| TrainError::Collective(format!("all-reduce (replica {}): {e:?}", self.rank)),
        )?;
        Ok(
            Tensor::<B::InnerBackend, 1>::from_primitive(TensorPrimitive::Float(r))
                .into_data()
                .convert::<f32>()
                .to_vec()
                .expect("float data"),
        )
    }
}

impl<B: AutodiffBackend> Drop for CollectiveSync<B> {
    fn drop(&mut self) {
        // Dropped without `finish`: an early return or a panic.
        if !self.finished {
            self.finished = true;
            reset_collective::<B::InnerBackend>();
        }
    }
}

const HEAD: usize = 6; // stop, non-finite, part 0 sum, part 1 sum, tokens, images

impl<B: AutodiffBackend> StepSync<B> for CollectiveSync<B> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn sum_units(&mut self, units: [u64; 2]) -> Result<[u64; 2]> {
        // Counts travel as f32: exact up to 2^24 units per step, and a relative 6e-8
        // beyond, negligible in a denominator.
        let r =
            self.all_reduce_floats(vec![units[0] as f32, units[1] as f32], ReduceOperation::Sum)?;
        Ok([r[0].round() as u64, r[1].round() as u64])
    }
    fn sync<M: AutodiffModule<B>>(
        &mut self,
        model: &M,
        mut grads: GradientsParams,
        local: LocalStep,
    ) -> Result<(GradientsParams, LocalStep)> {
        // 1. The step's figures and which parameters have a gradient, summed over replicas.
        let mut presence = Presence::<B> {
            grads: &grads,
            ids: Vec::new(),
            has: Vec::new(),
            _b: std::marker::PhantomData,
        };
        model.visit(&mut presence);
        let Presence { ids, has, .. } = presence;
        let mut v = vec![
            local.stop as u8 as f32,
            (!local.finite) as u8 as f32,
            local.sums[0] as f32,
            local.sums[1] as f32,
            local.tokens as f32,
            local.images as f32,
        ];
        v.extend(has.iter().map(|&h| h as u8 as f32));
        let r = self.all_reduce_floats(v, ReduceOperation::Sum)?;
        let global = LocalStep {
            stop: r[0] > 0.0,
            finite: r[1] == 0.0 && r[2..4].iter().all(|x| x.is_finite()),
            sums: [r[2] as f64, r[3] as f64],
            tokens: r[4].round() as u64,
            images: r[5].round() as u64,
        };
        // 2. Zeros for the parameters another replica has a gradient for and this one not,
        // so every replica all-reduces the same list.
        let missing: Vec<ParamId> = ids
            .iter()
            .zip(&has)
            .zip(&r[HEAD..])
            .filter(|((_, &h), &c)| !h && c > 0.0)
            .map(|((id, _), _)| *id)
            .collect();
        if !missing.is_empty() {
            let mut fill = ZeroFill::<B> {
                grads: &mut grads,
                missing: &missing,
                device: &self.device,
            };
            model.visit(&mut fill);
        }
        // 3. Burn's all-reduce of the gradients (each replica's is its share of the step's
        // objective, so they are summed; in parameter-id order).
        let grads = grads
            .all_reduce::<B::InnerBackend>(self.peer, ReduceOperation::Sum)
            .map_err(|e| {
                TrainError::Collective(format!(
                    "gradient all-reduce (replica {}): {e:?}",
                    self.rank
                ))
            })?;
        Ok((grads, global))
    }
}

struct Presence<'a, B: AutodiffBackend> {
    grads: &'a GradientsParams,
    ids: Vec<ParamId>,
    has: Vec<bool>,
    _b: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Presence<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.ids.push(param.id);
        self.has
            .push(self.grads.get::<B::InnerBackend, D>(param.id).is_some());
    }
}

struct ZeroFill<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    missing: &'a [ParamId],
    device: &'a B::Device,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ZeroFill<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.missing.contains(&param.id) {
            let zeros = Tensor::<B::InnerBackend, D>::zeros(param.shape(), self.device);
            self.grads.register(param.id, zeros);
        }
    }
}

/// Starts Burn's global collective orchestrator on `port` and serves until the process is
/// stopped (Ctrl-C): one per multi-node run, on a machine every node can reach.
pub fn serve_orchestrator(port: u16) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| TrainError::Collective(format!("cannot start a tokio runtime: {e}")))?;
    eprintln!("global collective orchestrator listening on 0.0.0.0:{port} (ws://)");
    rt.block_on(burn_collective::start_global_orchestrator(port));
    Ok(())
}

/// The error for an address that does not parse.
fn bad_address(address: &str, e: impl std::fmt::Display) -> TrainError {
    TrainError::Setting(format!("`{address}` is not an address: {e}"))
}
