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

/// Why an e-mail was not sent. Each variant is a code and a sentence, never the data: the recipient's
/// address, the SMTP server's reply (which often quotes the address) and file paths go to the service's log
/// with addresses masked ([`log_detail`]), not into span status, exception events, the notification row,
/// dead-letter headers or API answers, which all carry [`MailError::code`].
#[derive(Debug, thiserror::Error)]
pub enum MailError {
    #[error("invalid_address: the recipient or sender address is not valid")]
    Address,
    #[error("build_failed: the message could not be built")]
    Build,
    #[error("smtp_rejected: the SMTP server refused the message permanently")]
    SmtpRejected,
    #[error("smtp_transient: the SMTP server deferred the message")]
    SmtpTransient,
    #[error("smtp_unavailable: the SMTP server could not be reached")]
    SmtpUnavailable,
    #[error("sink_failed: the mail sink could not be written")]
    Sink,
    #[error("injected: injected failure (POST /_admin/faults)")]
    Injected,
}

impl MailError {
    /// The stable code stored and exported for this failure.
    pub fn code(&self) -> &'static str {
        match self {
            MailError::Address => "invalid_address",
            MailError::Build => "build_failed",
            MailError::SmtpRejected => "smtp_rejected",
            MailError::SmtpTransient => "smtp_transient",
            MailError::SmtpUnavailable => "smtp_unavailable",
            MailError::Sink => "sink_failed",
            MailError::Injected => "injected",
        }
    }

    fn smtp(error: &lettre::transport::smtp::Error) -> Self {
        log_detail("SMTP send failed", &error.to_string());
        if error.is_permanent() {
            MailError::SmtpRejected
        } else if error.is_transient() {
            MailError::SmtpTransient
        } else {
            MailError::SmtpUnavailable
        }
    }

    fn sink(error: &std::io::Error) -> Self {
        log_detail("mail sink write failed", &error.to_string());
        MailError::Sink
    }
}

/// The `Message-ID` of an order's confirmation: the same for every send of it.
pub fn message_id(order_id: uuid::Uuid) -> String {
    format!("<order-{order_id}@tracehop>")
}

/// Logs a failure's detail with e-mail addresses masked, for the log only
/// ([`tracehop_telemetry::setup::log_detail`]: never a span event).
pub fn log_detail(what: &str, detail: &str) {
    tracehop_telemetry::setup::log_detail(what, &mask_addresses(detail));
}

/// `text` with the local part of every e-mail address masked: `dani@example.com` -> `d***@example.com`.
pub fn mask_addresses(text: &str) -> String {
    let mut masked = String::with_capacity(text.len());
    for (index, word) in text.split('@').enumerate() {
        if index == 0 {
            masked.push_str(word);
            continue;
        }
        // `masked` ends with the previous word: mask its trailing local part.
        let local_start = masked
            .rfind(|c: char| !(c.is_alphanumeric() || "._%+-'".contains(c)))
            .map_or(0, |at| {
                at + masked[at..].chars().next().map_or(1, char::len_utf8)
            });
        if local_start < masked.len() {
            let first = masked[local_start..]
                .chars()
                .next()
                .map_or(0, char::len_utf8);
            masked.truncate(local_start + first);
            masked.push_str("***");
        }
        masked.push('@');
        masked.push_str(word);
    }
    masked
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
                    .map_err(|error| MailError::smtp(&error))?
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
                let from: Mailbox = self.from.parse().map_err(|_| MailError::Address)?;
                let to: Mailbox = email.to.parse().map_err(|_| MailError::Address)?;
                // The Message-ID is derived from the order: should the one remaining window (a crash between
                // the server's accept and our record) resend it, mail clients show one message.
                let message = Message::builder()
                    .message_id(Some(message_id(email.order_id)))
                    .from(from)
                    .to(to)
                    .subject(&email.subject)
                    .header(lettre::message::header::ContentType::TEXT_PLAIN)
                    .body(email.body.clone())
                    .map_err(|_| MailError::Build)?;
                smtp.send(message)
                    .await
                    .map_err(|error| MailError::smtp(&error))?;
            }
            Transport::Sink(path) => {
                let mut line = serde_json::to_vec(email).map_err(|_| MailError::Build)?;
                line.push(b'\n');
                if path == "-" {
                    tokio::io::stdout()
                        .write_all(&line)
                        .await
                        .map_err(|error| MailError::sink(&error))?;
                    return Ok(Sent::Delivered);
                }
                // A maildir-like folder: one file per order, created exclusively. The file system is the
                // idempotency key, so even a crash between "sent" and "recorded" cannot send twice.
                let folder = std::path::Path::new(path);
                tokio::fs::create_dir_all(folder)
                    .await
                    .map_err(|error| MailError::sink(&error))?;
                let final_path = folder.join(format!("{}.json", email.order_id));
                let partial =
                    folder.join(format!(".{}.{}.tmp", email.order_id, uuid::Uuid::new_v4()));
                tokio::fs::write(&partial, &line)
                    .await
                    .map_err(|error| MailError::sink(&error))?;
                // hard_link fails if the target exists: the e-mail was delivered before.
                let linked = tokio::fs::hard_link(&partial, &final_path).await;
                let _ = tokio::fs::remove_file(&partial).await;
                return match linked {
                    Ok(()) => Ok(Sent::Delivered),
                    Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
                        Ok(Sent::AlreadyDelivered)
                    }
                    Err(error) => Err(MailError::sink(&error)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_masked() {
        assert_eq!(
            mask_addresses("550 5.1.1 <dani.k@example.com>: Recipient address rejected"),
            "550 5.1.1 <d***@example.com>: Recipient address rejected"
        );
        assert_eq!(mask_addresses("a@b and xyz@c.d"), "a***@b and x***@c.d");
        assert_eq!(mask_addresses("no address here"), "no address here");
        assert_eq!(mask_addresses("@lonely"), "@lonely");
        assert_eq!(mask_addresses("é@x"), "é***@x");
    }

    #[test]
    fn errors_say_codes_not_data() {
        for error in [
            MailError::Address,
            MailError::Build,
            MailError::SmtpRejected,
            MailError::SmtpTransient,
            MailError::SmtpUnavailable,
            MailError::Sink,
            MailError::Injected,
        ] {
            assert!(error.to_string().starts_with(error.code()), "{error}");
            assert!(!error.to_string().contains('@'));
        }
    }
}
