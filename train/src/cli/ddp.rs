//! The binary's data-parallel part: `run --devices ...` (and its multi-node flags) and the
//! `orchestrator` subcommand. Needs the `collective` feature; without it they say so.

use clap::Args;
use transfusion_runtime::device::DeviceChoice;
use transfusion_train::config::ExperimentConfig;
use transfusion_train::RunOptions;

/// Data-parallel flags of `run`.
#[derive(Args, Debug, Clone)]
pub struct DdpArgs {
    /// Data-parallel training over several devices of this machine, one replica each:
    /// cuda:0,cuda:1,... (or cpu,cpu for a CPU smoke test). Needs the `collective`
    /// feature. Each device trains on `training.batch_size` rows x `grad_accum`
    /// micro-batches per step, so the global batch is that times the number of devices.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<DeviceChoice>,
    /// Multi-node: number of machines (processes) in the run, each started with the same
    /// flags except --node-rank and --node-address. Needs --orchestrator.
    #[arg(long)]
    pub num_nodes: Option<u32>,
    /// Multi-node: this machine's index, 0..num_nodes (node 0 writes the checkpoints).
    #[arg(long, default_value_t = 0)]
    pub node_rank: u32,
    /// Multi-node: the global orchestrator (`transfusion-train orchestrator`), ws://HOST:PORT.
    #[arg(long)]
    pub orchestrator: Option<String>,
    /// Multi-node: the address other nodes reach this one at, ws://THIS_HOST:DATA_PORT.
    #[arg(long)]
    pub node_address: Option<String>,
    /// Multi-node: the port this node serves gradients on (bound on 0.0.0.0).
    #[arg(long, default_value_t = 3001)]
    pub data_port: u16,
}

/// `orchestrator` subcommand.
#[derive(Args, Debug, Clone)]
pub struct OrchestratorArgs {
    /// Port to listen on (all interfaces).
    #[arg(long, default_value_t = 3000)]
    pub port: u16,
}

impl DdpArgs {
    /// Whether any data-parallel flag was given.
    pub fn requested(&self) -> bool {
        !self.devices.is_empty() || self.num_nodes.is_some()
    }
}

#[cfg(not(feature = "collective"))]
const NOT_BUILT: &str = "data-parallel training (--devices, --num-nodes, orchestrator) needs \
     Burn's collective, which this binary was built without: rebuild with `--features \
     collective` (e.g. `cargo build --release -p transfusion-train --features \
     cuda,collective`)";

/// Runs `transfusion-train run` data-parallel.
#[cfg(not(feature = "collective"))]
pub fn run(_a: &DdpArgs, _cfg: ExperimentConfig, _opts: RunOptions) -> anyhow::Result<()> {
    anyhow::bail!(NOT_BUILT)
}

/// Serves the global orchestrator.
#[cfg(not(feature = "collective"))]
pub fn orchestrator(_a: &OrchestratorArgs) -> anyhow::Result<()> {
    anyhow::bail!(NOT_BUILT)
}

/// Serves the global orchestrator.
#[cfg(feature = "collective")]
pub fn orchestrator(a: &OrchestratorArgs) -> anyhow::Result<()> {
    Ok(transfusion_train::ddp::serve_orchestrator(a.port)?)
}

/// Runs `transfusion-train run` data-parallel.
#[cfg(feature = "collective")]
pub fn run(a: &DdpArgs, cfg: ExperimentConfig, opts: RunOptions) -> anyhow::Result<()> {
    use burn::tensor::backend::AutodiffBackend;
    use transfusion_runtime::device::{dispatch_many, MultiDeviceTask};
    use transfusion_train::ddp::{run_training_ddp, MultiNode};
    use transfusion_train::TrainHooks;

    let multi_node = match a.num_nodes {
        None => {
            anyhow::ensure!(
                a.orchestrator.is_none() && a.node_address.is_none(),
                "--orchestrator/--node-address need --num-nodes"
            );
            None
        }
        Some(num_nodes) => Some(MultiNode {
            num_nodes,
            node_rank: a.node_rank,
            orchestrator: a.orchestrator.clone().ok_or_else(|| {
                anyhow::anyhow!("--num-nodes needs --orchestrator ws://HOST:PORT")
            })?,
            node_address: a.node_address.clone().ok_or_else(|| {
                anyhow::anyhow!("--num-nodes needs --node-address ws://THIS_HOST:DATA_PORT")
            })?,
            data_port: a.data_port,
        }),
    };
    let devices = if a.devices.is_empty() {
        vec![DeviceChoice::Cuda(0)]
    } else {
        a.devices.clone()
    };

    struct Task {
        cfg: ExperimentConfig,
        opts: RunOptions,
        multi_node: Option<MultiNode>,
    }
    impl MultiDeviceTask for Task {
        type Output = anyhow::Result<()>;
        fn run<B: AutodiffBackend>(self, devices: Vec<B::Device>, label: &str) -> Self::Output {
            let n = devices.len();
            let s = run_training_ddp::<B>(
                &self.cfg,
                &self.opts,
                &mut TrainHooks::default(),
                &devices,
                self.multi_node.as_ref(),
            )?;
            let nodes = self.multi_node.as_ref().map_or(1, |m| m.num_nodes as usize);
            println!(
                "done: {} steps ({} skipped) on {label} ({} replica(s) in all), global batch {} rows",
                s.steps,
                s.skipped_steps,
                n * nodes,
                self.cfg.training.batch_size * self.cfg.training.grad_accum * n * nodes,
            );
            s.print_outcome();
            Ok(())
        }
    }
    dispatch_many(
        &devices,
        Task {
            cfg,
            opts,
            multi_node,
        },
    )?
}

#[cfg(all(test, feature = "collective"))]
mod tests {
    use clap::Parser;

    use crate::cli::run::build_run_config;
    use crate::{Cli, Command};
    use transfusion_train::RunOptions;

    /// `run --devices cpu,cpu` end to end through the command line: two CPU replicas of the
    /// tiny preset for two steps, one checkpoint written by rank 0.
    #[test]
    fn run_with_two_cpu_devices() {
        let out = tempfile::tempdir().unwrap();
        let tok = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tokenizer.json");
        let cli = Cli::try_parse_from([
            "transfusion-train",
            "run",
            "--preset",
            "tiny",
            "--data",
            "shapes:64",
            "--steps",
            "2",
            "--batch-size",
            "1",
            "--tokenizer",
            tok.to_str().unwrap(),
            "--devices",
            "cpu,cpu",
            "--out",
            out.path().to_str().unwrap(),
        ])
        .unwrap();
        let Command::Run(a) = cli.command else {
            panic!("not a run")
        };
        assert_eq!(a.ddp.devices.len(), 2);
        assert!(a.ddp.requested());
        let (cfg, dir) = build_run_config(&a).unwrap();
        let mut opts = RunOptions::new(&a.out);
        opts.progress = false;
        opts.config_dir = dir;
        super::run(&a.ddp, cfg, opts).unwrap();
        assert!(out
            .path()
            .join("checkpoints/step-00000002/model.safetensors")
            .exists());

        let err = super::run(
            &super::DdpArgs {
                devices: vec!["cuda:0".parse().unwrap(), "wgpu".parse().unwrap()],
                ..a.ddp.clone()
            },
            build_run_config(&a).unwrap().0,
            RunOptions::new(out.path()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("all be cuda:N"), "{err}");
    }
}
