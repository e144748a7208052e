//! Drain signalling between a listener and its connections.
//!
//! The listener keeps a [`DrainSignal`]; its accept loop and every connection it accepted hold a
//! [`DrainWatch`]. Starting the drain tells them all to wind down (stop accepting, finish
//! in-flight work); [`DrainSignal::drained`] resolves once every watch is gone.

use tokio::sync::watch;

/// The listener's side: start the drain, then wait for it to finish.
#[derive(Debug)]
pub struct DrainSignal(watch::Sender<bool>);

/// A connection's (or accept loop's) side: learn that a drain started.
#[derive(Debug, Clone)]
pub struct DrainWatch(watch::Receiver<bool>);

impl DrainSignal {
    /// A new signal and the first watch on it.
    pub fn new() -> (Self, DrainWatch) {
        let (tx, rx) = watch::channel(false);
        (Self(tx), DrainWatch(rx))
    }

    /// Tells every watcher to drain.
    pub fn start(&self) {
        self.0.send_replace(true);
    }

    /// Resolves when every watcher has been dropped.
    pub async fn drained(&self) {
        self.0.closed().await;
    }
}

impl DrainWatch {
    /// Resolves once a drain has started (or the signal is gone, which means the same).
    pub async fn signaled(&mut self) {
        // Err = sender dropped: nobody can tell us to keep running any more.
        let _ = self.0.wait_for(|draining| *draining).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn drained_waits_for_every_watch() {
        let (signal, mut w1) = DrainSignal::new();
        let mut w2 = w1.clone();
        signal.start();
        w1.signaled().await;
        w2.signaled().await;
        drop(w1);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), signal.drained())
                .await
                .is_err()
        );
        drop(w2);
        tokio::time::timeout(Duration::from_secs(1), signal.drained())
            .await
            .unwrap();
    }
}
