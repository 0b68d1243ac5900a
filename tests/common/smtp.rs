//! An SMTP test double: a mail provider we cannot reach, speaking real SMTP (RFC 5321's happy path), that
//! records each message it accepted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

pub type Inbox = Arc<Mutex<Vec<String>>>;

/// A minimal SMTP server (RFC 5321 happy path): greets, accepts EHLO/MAIL/RCPT/DATA, records each message.
pub async fn smtp_server() -> (u16, Inbox) {
    smtp_server_with(false, Duration::ZERO).await
}

/// The same server; with `reject_recipients`, every `RCPT TO` gets a permanent 550 that quotes the address,
/// as real servers do; `accept_delay` delays the answer to each message's end (a slow provider).
pub async fn smtp_server_with(reject_recipients: bool, accept_delay: Duration) -> (u16, Inbox) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let inbox: Inbox = Arc::default();
    let recorder = inbox.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 test-smtp ESMTP\r\n").await.ok();
                let mut in_data = false;
                let mut message = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    if in_data {
                        if line == "." {
                            in_data = false;
                            tokio::time::sleep(accept_delay).await;
                            recorder.lock().unwrap().push(std::mem::take(&mut message));
                            write.write_all(b"250 2.0.0 queued\r\n").await.ok();
                        } else {
                            message.push_str(&line);
                            message.push('\n');
                        }
                        continue;
                    }
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_ascii_uppercase();
                    if reject_recipients && verb == "RCPT" {
                        let address = line.split(':').nth(1).unwrap_or_default().trim().to_owned();
                        let reply = format!(
                            "550 5.1.1 {address}: Recipient address rejected: User unknown\r\n"
                        );
                        write.write_all(reply.as_bytes()).await.ok();
                        continue;
                    }
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" => b"250-test-smtp\r\n250 8BITMIME\r\n",
                        "HELO" | "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 2.0.0 OK\r\n",
                        "DATA" => {
                            in_data = true;
                            b"354 end with <CRLF>.<CRLF>\r\n"
                        }
                        "QUIT" => {
                            write.write_all(b"221 2.0.0 bye\r\n").await.ok();
                            break;
                        }
                        _ => b"502 5.5.2 not implemented\r\n",
                    };
                    write.write_all(reply).await.ok();
                }
            });
        }
    });
    (port, inbox)
}

/// The `Message-ID` of a recorded message.
pub fn message_id(message: &str) -> Option<String> {
    message
        .lines()
        .find_map(|line| line.strip_prefix("Message-ID: "))
        .map(|id| id.trim().to_owned())
}
