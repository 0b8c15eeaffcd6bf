//! The `ouro` binary: parses the command line and runs the subcommand.

use clap::Parser;
use server::cli::{Cli, Command, LogFormat};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            // candle (the speculator trainer's tensor math) sizes its thread
            // pool from RAYON_NUM_THREADS; keep it to --trainer-threads.
            if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                std::env::set_var("RAYON_NUM_THREADS", args.trainer.trainer_threads.max(1).to_string());
            }
            server::cli::init_tracing(args.log_format);
            server::cli::serve(args).await
        }
        Command::Bench(args) => {
            server::cli::init_tracing(LogFormat::Text);
            server::bench::run(args).await
        }
        Command::Speculator(server::cli::SpeculatorCommand::Pretrain(args)) => {
            if std::env::var_os("RAYON_NUM_THREADS").is_none() {
                std::env::set_var("RAYON_NUM_THREADS", args.model.threads().to_string());
            }
            server::cli::init_tracing(LogFormat::Text);
            server::cli::speculator_pretrain(args)
        }
        Command::Speculator(server::cli::SpeculatorCommand::Init(args)) => {
            server::cli::init_tracing(LogFormat::Text);
            server::cli::speculator_init(args)
        }
        Command::Replay(args) => server::replay::run(args).await,
        Command::Calibrate(args) => {
            server::cli::init_tracing(LogFormat::Text);
            server::tca_cli::calibrate(args)
        }
        Command::TcaBench(args) => {
            server::cli::init_tracing(LogFormat::Text);
            server::tca_cli::bench(args)
        }
        Command::FetchModel(args) => {
            let path = server::fetch::default_model(&args.cache_dir)?;
            println!("{}", path.display());
            Ok(())
        }
    }
}
