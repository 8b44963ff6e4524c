//! Terminal progress bars for pulls.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};

/// Draws one bar per phase on stderr (hidden when stderr is not a terminal).
#[derive(Default)]
pub struct Bar {
    bar: Mutex<Option<ProgressBar>>,
}

impl capy_store::Progress for Bar {
    fn begin(&self, label: &str, total: Option<u64>) {
        let pb = match total {
            Some(t) => {
                let pb = ProgressBar::new(t);
                pb.set_style(
                    ProgressStyle::with_template(
                        "{msg:30} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                pb
            }
            None => ProgressBar::new_spinner(),
        };
        pb.set_message(label.to_string());
        if let Ok(mut g) = self.bar.lock() {
            if let Some(old) = g.replace(pb) {
                old.finish_and_clear();
            }
        }
    }

    fn advance(&self, bytes: u64) {
        if let Ok(g) = self.bar.lock() {
            if let Some(pb) = g.as_ref() {
                pb.inc(bytes);
            }
        }
    }

    fn end(&self) {
        if let Ok(mut g) = self.bar.lock() {
            if let Some(pb) = g.take() {
                pb.finish_and_clear();
            }
        }
    }
}
