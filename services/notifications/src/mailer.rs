//! Sending one e-mail: over SMTP (lettre) when `SMTP_URL` is set, otherwise to a local sink.

use std::sync::atomic::{AtomicU32, Ordering};

use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::io::AsyncWriteExt;

use crate::configuration::MailSettings;

/// A confirmation to send.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Email {
    pub to: String,
    pub subject: String,
    pub body: String,
    pub order_id: uuid::Uuid,
    pub trace_id: String,
}

/// What a successful send did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Delivered,
    /// The sink already held this order's e-mail (a retry after a crash): nothing new was delivered.
    AlreadyDelivered,
}

/// Why an e-mail was not sent.
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("invalid address: {0}")]
    Address(String),
    #[error("could not build the message: {0}")]
    Build(String),
    #[error("SMTP: {0}")]
    Smtp(String),
    #[error("mail sink: {0}")]
    Sink(#[from] std::io::Error),
    #[error("injected failure (POST /_admin/faults)")]
    Injected,
}

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Sink(String),
}

/// The configured transport, plus the fault injection switch.
pub struct Mailer {
    transport: Transport,
    from: String,
    fail_next: AtomicU32,
}

impl Mailer {
    pub fn new(settings: &MailSettings) -> Result<Self, MailError> {
        let transport = match &settings.smtp_url {
            Some(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .map_err(|error| MailError::Smtp(error.to_string()))?
                    .build(),
            ),
            None => Transport::Sink(settings.sink.clone()),
        };
        Ok(Self {
            transport,
            from: settings.from.clone(),
            fail_next: AtomicU32::new(0),
        })
    }

    /// Makes the next `count` sends fail.
    pub fn fail_next(&self, count: u32) {
        self.fail_next.store(count, Ordering::SeqCst);
    }

    fn take_injected_failure(&self) -> bool {
        self.fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    #[tracing::instrument(name = "mail.send", skip_all, fields(mail.transport = self.transport_name()), err(Display))]
    pub async fn send(&self, email: &Email) -> Result<Sent, MailError> {
        if self.take_injected_failure() {
            return Err(MailError::Injected);
        }
        match &self.transport {
            Transport::Smtp(smtp) => {
                let from: Mailbox = self
                    .from
                    .parse()
                    .map_err(|_| MailError::Address(self.from.clone()))?;
                let to: Mailbox = email
                    .to
                    .parse()
                    .map_err(|_| MailError::Address(email.to.clone()))?;
                let message = Message::builder()
                    .from(from)
                    .to(to)
                    .subject(&email.subject)
                    .header(lettre::message::header::ContentType::TEXT_PLAIN)
                    .body(email.body.clone())
                    .map_err(|error| MailError::Build(error.to_string()))?;
                smtp.send(message)
                    .await
                    .map_err(|error| MailError::Smtp(error.to_string()))?;
            }
            Transport::Sink(path) => {
                let mut line = serde_json::to_vec(email)
                    .map_err(|error| MailError::Build(error.to_string()))?;
                line.push(b'\n');
                if path == "-" {
                    tokio::io::stdout().write_all(&line).await?;
                    return Ok(Sent::Delivered);
                }
                // A maildir-like folder: one file per order, created exclusively. The file system is the
                // idempotency key, so even a crash between "sent" and "recorded" cannot send twice.
                let folder = std::path::Path::new(path);
                tokio::fs::create_dir_all(folder).await?;
                let final_path = folder.join(format!("{}.json", email.order_id));
                let partial =
                    folder.join(format!(".{}.{}.tmp", email.order_id, uuid::Uuid::new_v4()));
                tokio::fs::write(&partial, &line).await?;
                // hard_link fails if the target exists: the e-mail was delivered before.
                let linked = tokio::fs::hard_link(&partial, &final_path).await;
                let _ = tokio::fs::remove_file(&partial).await;
                return match linked {
                    Ok(()) => Ok(Sent::Delivered),
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                        Ok(Sent::AlreadyDelivered)
                    }
                    Err(error) => Err(error.into()),
                };
            }
        }
        Ok(Sent::Delivered)
    }

    fn transport_name(&self) -> &'static str {
        match self.transport {
            Transport::Smtp(_) => "smtp",
            Transport::Sink(_) => "sink",
        }
    }
}
