//! RabbitMQ: connection, topology, the confirming publisher and the properties of
//! what we publish. Knows nothing about SQL.

#[cfg(test)]
mod hostile_frames;
pub mod io_thread;
mod nodes;
pub mod properties;
mod publisher;
mod topology;

pub use lapin::message::Delivery;
pub use lapin::{Channel, Connection, Consumer};
/// A message's AMQP properties: the message model the contract is written in
/// (CONTRACT §2), which the pipeline reads and writes as data.
pub type Properties = lapin::BasicProperties;
/// A header table of those properties, and one of its values.
pub type Headers = lapin::types::FieldTable;
pub type HeaderValue = lapin::types::AMQPValue;
pub use nodes::{nodes, split_urls, tls, Nodes, NodesError};
pub use publisher::{confirmed, Outgoing, PublishError, Publisher};
pub use topology::{
    bulk_queue_arguments, command_queue_arguments, declare, email_queue_arguments, TopologyError,
};

use lapin::uri::AMQPUri;
use lapin::ConnectionProperties;

pub use lapin::tcp::OwnedTLSConfig;

/// Connects; for `amqps://`, `tls` may add trusted certificate authorities to
/// the system's (the broker's certificate and host name are always verified).
pub async fn connect(uri: &AMQPUri, tls: &OwnedTLSConfig) -> Result<Connection, lapin::Error> {
    Connection::connect_uri_with_config(
        uri.clone(),
        ConnectionProperties::default(),
        tls.clone(),
        lapin::runtime::default_runtime()?,
    )
    .await
}

/// A one-line description of a lapin error, including the broker's reply text.
pub fn describe(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().as_str().to_string(),
        lapin::ErrorKind::IOError(io) => io.to_string(),
        _ => e.to_string(),
    }
}
