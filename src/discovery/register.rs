//! Keeping one key in etcd on a lease: the manager's `/services/push-manager/<id>`, and
//! `connect-node-sim`'s registration.
//!
//! A background task grants a lease of the given TTL, puts the key on it, and keeps the
//! lease alive (a keep-alive every third of the TTL). When the lease is lost (it expired
//! while etcd was unreachable, or someone revoked it) or the keep-alive stream breaks, the
//! task registers again on a new lease, retrying with exponential backoff; each outage is
//! logged once. [`Registration::stop`] revokes the lease, which deletes the key at once,
//! instead of leaving it until the TTL runs out. After a crash the key outlives the process
//! by at most the TTL.

use std::time::Duration;

use backoff::backoff::Backoff;
use etcd_client::{Client, LeaseKeepAliveStream, LeaseKeeper, PutOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{retry_backoff, DiscoveryError, EtcdSettings};

/// Longest pause between two registration attempts.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// A key kept on a lease until [`Registration::stop`]; see the module docs.
pub struct Registration {
    key: String,
    stop: CancellationToken,
    task: JoinHandle<bool>,
    registered: watch::Receiver<bool>,
}

impl Registration {
    /// Starts keeping `key = value` in etcd on a lease of `ttl` (whole seconds, at least
    /// one), in a task on the current tokio runtime. Never fails: an unreachable etcd is
    /// retried in the background.
    pub fn start(settings: EtcdSettings, key: String, value: String, ttl: Duration) -> Self {
        let stop = CancellationToken::new();
        let (tx, registered) = watch::channel(false);
        let keeper = Keeper {
            settings,
            key: key.clone(),
            value,
            ttl_secs: i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX),
            stop: stop.clone(),
            registered: tx,
            client: None,
            client_tls: Vec::new(),
            lease: None,
            down_since: None,
            ever_registered: false,
        };
        Registration {
            key,
            stop,
            task: tokio::spawn(keeper.run()),
            registered,
        }
    }

    /// The key being kept.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// True while the key is in etcd on a live lease (as far as this process knows).
    pub fn registered(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Waits until the key is registered, at most `bound`; returns whether it is.
    pub async fn wait_registered(&self, bound: Duration) -> bool {
        let mut rx = self.registered.clone();
        tokio::time::timeout(bound, rx.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Revokes the lease (deleting the key) and stops, within `timeout`. Returns whether
    /// the key was revoked; if not (etcd unreachable), it goes when its lease expires.
    pub async fn stop(self, timeout: Duration) -> bool {
        self.stop.cancel();
        let mut task = self.task;
        match tokio::time::timeout(timeout, &mut task).await {
            Ok(Ok(revoked)) => revoked,
            Ok(Err(e)) => {
                tracing::error!(key = %self.key, error = %e, "the registration task failed");
                false
            }
            Err(_) => {
                task.abort();
                tracing::warn!(key = %self.key, ?timeout,
                               "could not revoke the registration in time; it expires with its lease");
                false
            }
        }
    }
}

struct Keeper {
    settings: EtcdSettings,
    key: String,
    value: String,
    ttl_secs: i64,
    stop: CancellationToken,
    registered: watch::Sender<bool>,
    client: Option<Client>,
    /// The TLS files as they were when `client` was made: a client made before they changed
    /// is replaced at the next (re)connection, so renewed certificates are used.
    client_tls: crate::discovery::TlsStamps,
    /// The lease the key is on, if any.
    lease: Option<i64>,
    /// Set while etcd does not let us register: an outage is logged once.
    down_since: Option<tokio::time::Instant>,
    ever_registered: bool,
}

impl Keeper {
    /// Runs until stopped; returns whether the final revoke succeeded.
    async fn run(mut self) -> bool {
        let mut backoff = retry_backoff(RETRY_MAX);
        let stop = self.stop.clone();
        loop {
            let attempt = tokio::select! {
                _ = stop.cancelled() => None,
                r = self.register() => Some(r),
            };
            let Some(attempt) = attempt else {
                return self.revoke().await;
            };
            match attempt {
                Ok((keeper, stream)) => {
                    backoff.reset();
                    self.registered.send_replace(true);
                    match self.down_since.take() {
                        Some(since) => tracing::info!(key = %self.key, down = ?since.elapsed(),
                                                      "registered in etcd again"),
                        None if !self.ever_registered => {
                            tracing::info!(key = %self.key, value = %self.value, ttl_s = self.ttl_secs,
                                           "registered in etcd")
                        }
                        None => tracing::info!(key = %self.key, "registered in etcd again"),
                    }
                    self.ever_registered = true;
                    let lost = match self.keep_alive(keeper, stream).await {
                        None => return self.revoke().await,
                        Some(e) => e,
                    };
                    self.registered.send_replace(false);
                    self.down(&lost);
                }
                Err(e) => self.down(&e),
            }
            let delay = backoff.next_backoff().unwrap_or(RETRY_MAX);
            tokio::select! {
                _ = stop.cancelled() => return self.revoke().await,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn down(&mut self, e: &DiscoveryError) {
        if self.down_since.is_none() {
            self.down_since = Some(tokio::time::Instant::now());
            tracing::warn!(key = %self.key, error = %e,
                           "etcd registration lost or not possible; retrying with backoff");
        } else {
            tracing::debug!(key = %self.key, error = %e, "etcd registration retry failed");
        }
    }

    /// Grants a lease, puts the key on it, opens the keep-alive stream.
    async fn register(&mut self) -> Result<(LeaseKeeper, LeaseKeepAliveStream), DiscoveryError> {
        let mut client = {
            let stamps = self.settings.tls_stamps();
            match &self.client {
                Some(c) if stamps == self.client_tls => c.clone(),
                previous => {
                    if previous.is_some() {
                        tracing::info!("etcd TLS files changed; connecting with them");
                    }
                    let c = self.settings.connect().await?;
                    self.client = Some(c.clone());
                    self.client_tls = stamps;
                    c
                }
            }
        };
        let lease = client.lease_grant(self.ttl_secs, None).await?.id();
        let previous = self.lease.replace(lease);
        client
            .put(
                self.key.clone(),
                self.value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        let (keeper, stream) = client.lease_keep_alive(lease).await?;
        if let Some(old) = previous.filter(|old| *old != lease) {
            // The key is on the new lease now; the old one would only linger until its TTL.
            let _ = client.lease_revoke(old).await;
        }
        Ok((keeper, stream))
    }

    /// Keeps the lease alive. Returns `None` when stopped, or why the lease was lost.
    async fn keep_alive(
        &mut self,
        mut keeper: LeaseKeeper,
        mut stream: LeaseKeepAliveStream,
    ) -> Option<DiscoveryError> {
        let lease = keeper.id();
        let every = Duration::from_millis(
            u64::try_from(self.ttl_secs)
                .unwrap_or(1)
                .saturating_mul(1000)
                / 3,
        );
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = tick.tick() => {
                    if let Err(e) = keeper.keep_alive().await {
                        return Some(e.into());
                    }
                }
                msg = stream.message() => match msg {
                    Ok(Some(resp)) if resp.ttl() <= 0 => return Some(DiscoveryError::LeaseLost(lease)),
                    Ok(Some(_)) => {}
                    Ok(None) => return Some(DiscoveryError::StreamEnded {
                        what: "keep-alive",
                        reason: "closed by etcd".into(),
                    }),
                    Err(e) => return Some(e.into()),
                },
            }
        }
    }

    /// Revokes the current lease, deleting the key. Returns whether it was revoked.
    async fn revoke(&mut self) -> bool {
        self.registered.send_replace(false);
        let (Some(lease), Some(client)) = (self.lease, self.client.as_mut()) else {
            return false;
        };
        match client.lease_revoke(lease).await {
            Ok(_) => {
                tracing::info!(key = %self.key, "deregistered from etcd (lease revoked)");
                true
            }
            Err(e) => {
                let e = DiscoveryError::from(e);
                // A lease that is already gone has taken the key with it.
                let gone = e.to_string().contains("lease not found");
                if !gone {
                    tracing::warn!(key = %self.key, error = %e,
                                   "cannot revoke the etcd lease; the key expires with it");
                }
                gone
            }
        }
    }
}
