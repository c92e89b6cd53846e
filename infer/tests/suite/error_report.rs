//! `error::report`: an error and each cause its message does not already say, once.

use transfusion_data::DataError;
use transfusion_infer::InferError;
use transfusion_runtime::report;

#[test]
fn causes_already_in_the_message_are_not_repeated() {
    // DataError::Io says its source in its own message and also exposes it as the source.
    let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
    let e = InferError::from(DataError::io("/x/tokenizer.json", io)).within("checkpoint /x");
    let text = report(&e);
    assert_eq!(text, "checkpoint /x: cannot read /x/tokenizer.json: gone");
}

#[test]
fn causes_the_message_does_not_say_are_appended() {
    let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
    let e = anyhow::Error::new(io).context("writing run files");
    assert_eq!(report(e.as_ref()), "writing run files: denied");
}
