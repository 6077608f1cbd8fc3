//! The control core: one thread, pinned, running a tokio current-thread runtime for the
//! work that needs tokio (amqprs, etcd-client): the change-capture forwarder and the etcd
//! registration, and the metrics endpoint (/metrics, /healthz, /readyz). Shard cores never
//! wait on it; they hand it work through bounded queues.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::cdc::forwarder::Forwarder;
use crate::cluster::registration::Registration;

/// How often the metrics endpoint looks at the stop flag.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// Where the control thread runs: its CPU, and its niceness when that CPU is also a shard
/// core's (None: normal priority).
pub struct Placement {
    pub cpu: Option<usize>,
    pub shared_nice: Option<i32>,
}

/// Starts the control thread when there is anything for it to do. It runs until `stop` is
/// set (after the shard cores have stopped) and its tasks have finished.
pub fn spawn(
    forwarder: Option<Forwarder>,
    registration: Option<Registration>,
    follower: Option<crate::cluster::follower::Follower>,
    metrics: Option<(std::net::TcpListener, Arc<crate::metrics::Node>)>,
    placement: Placement,
    stop: Arc<AtomicBool>,
) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
    if forwarder.is_none() && registration.is_none() && metrics.is_none() {
        return Ok(None);
    }
    let thread = std::thread::Builder::new().name("flux-control".into()).spawn(move || {
        if let Some(id) = placement.cpu {
            if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                tracing::warn!(cpu = id, "cannot pin the control core");
            }
        }
        if let Some(nice) = placement.shared_nice {
            // SAFETY: plain syscalls on the calling thread (Linux keeps niceness per thread).
            let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
            if set != 0 {
                tracing::warn!(nice, error = %std::io::Error::last_os_error(), "cannot lower the control core's priority");
            }
        }
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "control core: cannot start its runtime");
                return;
            }
        };
        rt.block_on(async {
            let forward = async {
                if let Some(f) = forwarder {
                    f.run(stop.clone()).await;
                }
            };
            let register = async {
                if let Some(r) = registration {
                    r.run(stop.clone()).await;
                }
            };
            let follow = async {
                if let Some(f) = follower {
                    f.run(stop.clone()).await;
                }
            };
            let serve = async {
                if let Some((listener, node)) = metrics {
                    let stopped = stop.clone();
                    let until_stop = async move {
                        while !stopped.load(std::sync::atomic::Ordering::Acquire) {
                            tokio::time::sleep(STOP_POLL).await;
                        }
                    };
                    crate::metrics::serve(listener, node, until_stop).await;
                }
            };
            tokio::join!(forward, register, follow, serve);
        });
    })?;
    Ok(Some(thread))
}
