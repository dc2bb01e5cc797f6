//! What a test leaves on the servers, removed even when it panics.

use crate::*;
use lapin::options::*;
use lapin::{Connection, ConnectionProperties};

/// What a test leaves on the servers: its queues and exchanges and its
/// database. [`Env::teardown`] removes them; a test that panics before it gets
/// there has them removed by this guard's `Drop`, on a thread and runtime of
/// its own (`Drop` cannot await, and the test's runtime may be unwinding).
pub(crate) struct Leftovers {
    pub(crate) servers: Servers,
    pub(crate) broker: profile_worker::config::BrokerSettings,
    pub(crate) db_name: String,
    pub(crate) done: bool,
}

impl Leftovers {
    pub(crate) async fn remove(&self) {
        // A fresh connection: the harness's own may have died with a broker restart.
        if let Ok(conn) =
            Connection::connect(&self.servers.admin_amqp, ConnectionProperties::default()).await
        {
            if let Ok(channel) = conn.create_channel().await {
                let b = &self.broker;
                for q in [
                    &b.command_queue,
                    &b.bulk_queue,
                    &b.dead_letter_queue,
                    &b.email_queue,
                    &b.email_dead_letter_queue(),
                ] {
                    let _ = channel
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let unrouted = b.unrouted_exchange();
                let bulk_unrouted = b.bulk_unrouted_exchange();
                for x in [
                    &b.command_exchange,
                    &b.bulk_exchange,
                    &bulk_unrouted,
                    &b.dead_letter_exchange,
                    &b.events_exchange,
                    &b.email_exchange,
                    &b.email_dead_letter_exchange(),
                    &unrouted,
                ] {
                    let _ = channel
                        .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                        .await;
                }
            }
            let _ = conn.close(200, "bye".into()).await;
        }
        drop_database(&self.servers.admin_db, &self.db_name).await;
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let leftovers = Leftovers {
            servers: self.servers.clone(),
            broker: self.broker.clone(),
            db_name: std::mem::take(&mut self.db_name),
            done: true,
        };
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(leftovers.remove()))
        })
        .join();
    }
}
