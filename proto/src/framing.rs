//! Length-prefixed JSON frames: a 4-byte big-endian length, then that many bytes of JSON.

use serde::{Serialize, de::DeserializeOwned};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame either side accepts (1 MiB). Model lists and doctor reports fit easily;
/// anything larger is a bug or an attack.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads one frame. Returns `Ok(None)` on a clean end of stream between frames.
///
/// The announced length is checked against `max` before any buffer is allocated.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut len_bytes = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let n = reader.read(&mut len_bytes[filled..]).await?;
        if n == 0 {
            return if filled == 0 { Ok(None) } else { Err(FrameError::Truncated) };
        }
        filled += n;
    }
    let len = u32::from_be_bytes(len_bytes) as usize;
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = vec![0u8; len];
    reader.read_exact(&mut buf).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    Ok(Some(buf))
}

/// Writes one frame holding `payload` and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge { len: payload.len(), max: MAX_FRAME_BYTES });
    }
    let len = u32::try_from(payload.len()).expect("frame length checked against MAX_FRAME_BYTES");
    writer.write_all(&len.to_be_bytes()).await?;
    writer.write_all(payload).await?;
    writer.flush().await?;
    Ok(())
}

/// Serialises `message` and writes it as one frame.
pub async fn write_message<W: AsyncWrite + Unpin, T: Serialize>(writer: &mut W, message: &T) -> Result<(), FrameError> {
    let payload = serde_json::to_vec(message).map_err(FrameError::Malformed)?;
    write_frame(writer, &payload).await
}

/// Reads one frame and deserialises it. `Ok(None)` on a clean end of stream.
pub async fn read_message<R: AsyncRead + Unpin, T: DeserializeOwned>(reader: &mut R) -> Result<Option<T>, FrameError> {
    match read_frame(reader, MAX_FRAME_BYTES).await? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(FrameError::Malformed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_and_limits() {
        let (mut a, mut b) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            write_frame(&mut a, b"{\"x\":1}").await.unwrap();
            a.write_all(&(10_000_000u32).to_be_bytes()).await.unwrap();
        });
        assert_eq!(read_frame(&mut b, 1024).await.unwrap().unwrap(), b"{\"x\":1}");
        match read_frame(&mut b, 1024).await {
            Err(FrameError::TooLarge { len: 10_000_000, max: 1024 }) => {}
            other => panic!("expected TooLarge, got {other:?}"),
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn clean_eof_and_truncation() {
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(read_frame(&mut b, 1024).await.unwrap().is_none());

        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 9, b'{']).await.unwrap();
        drop(a);
        assert!(matches!(read_frame(&mut b, 1024).await, Err(FrameError::Truncated)));
    }
}
