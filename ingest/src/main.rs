//! The `ingest` binary: parse the command line, set up logging, run.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = ingest::cli::Cli::parse();
    // After parsing: `serve --log-format` chooses the format, and only the
    // server exports traces.
    let telemetry = ingest::observability::init(cli.log_format(), cli.serves());
    let result = cli.run().await;
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `ingest devices list | head` closing the pipe early is not an error.
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
