//! The checkpoint file format and its streaming writer.
//!
//! ```text
//! header : [magic "IMSCKPT1": 8][covered_lsn: u64 LE]
//! data   : data_len bytes, streamed by the caller
//! trailer: [data_len: u64 LE][data_crc32c: u32 LE][meta_crc32c: u32 LE]
//! ```
//!
//! The length and checksum of the data are only known once the caller's writer has finished,
//! and storage files are append-only, so they live in a trailer rather than the header.
//! `meta_crc32c` covers the header and the first twelve trailer bytes. A checkpoint is valid
//! only if every field checks out and `covered_lsn` matches the file name; the log only ever
//! renames a checkpoint to its final name after it was fully written and fsynced.

use std::io;

#[cfg(test)]
use std::ops::Range;

use crate::Lsn;
use crate::storage::StorageFile;

const MAGIC: &[u8; 8] = b"IMSCKPT1";
const HEADER_BYTES: usize = 16;
const TRAILER_BYTES: usize = 16;
/// The writer hands data to storage in chunks of this size (bounds its memory).
const WRITE_CHUNK_BYTES: usize = 256 * 1024;

/// The header of a checkpoint covering `covered_lsn`.
pub(crate) fn header(covered_lsn: Lsn) -> [u8; HEADER_BYTES] {
    let mut header = [0u8; HEADER_BYTES];
    header[..8].copy_from_slice(MAGIC);
    header[8..].copy_from_slice(&covered_lsn.to_le_bytes());
    header
}

fn trailer(header: &[u8], data_len: u64, data_crc: u32) -> [u8; TRAILER_BYTES] {
    let mut trailer = [0u8; TRAILER_BYTES];
    trailer[..8].copy_from_slice(&data_len.to_le_bytes());
    trailer[8..12].copy_from_slice(&data_crc.to_le_bytes());
    let meta_crc = crc32c::crc32c_append(crc32c::crc32c(header), &trailer[..12]);
    trailer[12..].copy_from_slice(&meta_crc.to_le_bytes());
    trailer
}

/// Validates a whole checkpoint file in memory and returns the byte range of its data (the
/// reference that [`verify_stream`] is tested against).
#[cfg(test)]
pub(crate) fn decode(file: &[u8], covered_lsn: Lsn) -> Result<Range<usize>, String> {
    if file.len() < HEADER_BYTES + TRAILER_BYTES {
        return Err(format!("file of {} bytes is too short", file.len()));
    }
    let (header, rest) = file.split_at(HEADER_BYTES);
    let (data, trailer_bytes) = rest.split_at(rest.len() - TRAILER_BYTES);
    check_header(header, covered_lsn)?;
    let mut data_len = [0u8; 8];
    data_len.copy_from_slice(&trailer_bytes[..8]);
    let mut data_crc = [0u8; 4];
    data_crc.copy_from_slice(&trailer_bytes[8..12]);
    let (data_len, data_crc) = (u64::from_le_bytes(data_len), u32::from_le_bytes(data_crc));
    if trailer(header, data_len, data_crc) != trailer_bytes {
        return Err("trailer checksum mismatch".to_string());
    }
    if data_len != data.len() as u64 {
        return Err(format!(
            "data length {} but {} bytes present",
            data_len,
            data.len()
        ));
    }
    if crc32c::crc32c(data) != data_crc {
        return Err("data checksum mismatch".to_string());
    }
    Ok(HEADER_BYTES..HEADER_BYTES + data.len())
}

/// Validates a checkpoint file by streaming it once through the checksums (memory: one
/// chunk), and returns the length of its data, which starts at [`DATA_OFFSET`].
pub(crate) fn verify_stream(
    mut file: impl io::Read,
    file_len: u64,
    covered_lsn: Lsn,
) -> Result<u64, String> {
    let frame = (HEADER_BYTES + TRAILER_BYTES) as u64;
    if file_len < frame {
        return Err(format!("file of {file_len} bytes is too short"));
    }
    let read_error = |error: io::Error| format!("reading: {error}");
    let mut header = [0u8; HEADER_BYTES];
    file.read_exact(&mut header).map_err(read_error)?;
    check_header(&header, covered_lsn)?;
    let data_len = file_len - frame;
    let mut chunk = vec![0u8; WRITE_CHUNK_BYTES];
    let mut left = data_len;
    let mut data_crc = 0u32;
    while left > 0 {
        let take = left.min(chunk.len() as u64) as usize;
        file.read_exact(&mut chunk[..take]).map_err(read_error)?;
        data_crc = crc32c::crc32c_append(data_crc, &chunk[..take]);
        left -= take as u64;
    }
    let mut trailer_bytes = [0u8; TRAILER_BYTES];
    file.read_exact(&mut trailer_bytes).map_err(read_error)?;
    let mut stored_len = [0u8; 8];
    stored_len.copy_from_slice(&trailer_bytes[..8]);
    let mut stored_crc = [0u8; 4];
    stored_crc.copy_from_slice(&trailer_bytes[8..12]);
    let (stored_len, stored_crc) = (
        u64::from_le_bytes(stored_len),
        u32::from_le_bytes(stored_crc),
    );
    if trailer(&header, stored_len, stored_crc) != trailer_bytes {
        return Err("trailer checksum mismatch".to_string());
    }
    if stored_len != data_len {
        return Err(format!(
            "data length {stored_len} but {data_len} bytes present"
        ));
    }
    if stored_crc != data_crc {
        return Err("data checksum mismatch".to_string());
    }
    Ok(data_len)
}

/// Where a checkpoint's data starts in its file.
pub(crate) const DATA_OFFSET: u64 = HEADER_BYTES as u64;

/// Streams checkpoint data into a storage file, computing its length and checksum; the
/// header is written by [`CheckpointWriter::new`] and the trailer by
/// [`CheckpointWriter::finish`].
pub(crate) struct CheckpointWriter {
    file: Box<dyn StorageFile>,
    header: [u8; HEADER_BYTES],
    buffer: Vec<u8>,
    data_len: u64,
    data_crc: u32,
}

impl CheckpointWriter {
    pub(crate) fn new(mut file: Box<dyn StorageFile>, covered_lsn: Lsn) -> io::Result<Self> {
        let header = header(covered_lsn);
        file.write_all(&header)?;
        Ok(CheckpointWriter {
            file,
            header,
            buffer: Vec::with_capacity(WRITE_CHUNK_BYTES),
            data_len: 0,
            data_crc: 0,
        })
    }

    fn flush_buffer(&mut self) -> io::Result<()> {
        if !self.buffer.is_empty() {
            self.file.write_all(&self.buffer)?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Writes the trailer and returns the file (not yet synced) and the data length.
    pub(crate) fn finish(mut self) -> io::Result<(Box<dyn StorageFile>, u64)> {
        self.flush_buffer()?;
        let trailer = trailer(&self.header, self.data_len, self.data_crc);
        self.file.write_all(&trailer)?;
        Ok((self.file, self.data_len))
    }
}

impl io::Write for CheckpointWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.data_crc = crc32c::crc32c_append(self.data_crc, buf);
        self.data_len += buf.len() as u64;
        if self.buffer.len() + buf.len() > WRITE_CHUNK_BYTES {
            self.flush_buffer()?;
        }
        if buf.len() >= WRITE_CHUNK_BYTES {
            self.file.write_all(buf)?;
        } else {
            self.buffer.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buffer()
    }
}

/// Checks a checkpoint header: the magic, then the LSN it covers against the file's name.
fn check_header(header: &[u8], covered_lsn: Lsn) -> Result<(), String> {
    if &header[..8] != MAGIC {
        return Err("bad magic".to_string());
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&header[8..16]);
    if u64::from_le_bytes(lsn) != covered_lsn {
        return Err("covered lsn does not match the file name".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::FaultyStorage;
    use crate::storage::Storage;

    #[test]
    fn checkpoint_round_trips_and_rejects_any_bit_flip() {
        let storage = FaultyStorage::new();
        let file = storage.create("c").expect("create");
        let mut writer = CheckpointWriter::new(file, 77).expect("header");
        writer.write_all(b"snapshot ").expect("write");
        writer
            .write_all(&vec![5u8; WRITE_CHUNK_BYTES + 3])
            .expect("write");
        let (_file, len) = writer.finish().expect("finish");
        assert_eq!(len, 9 + WRITE_CHUNK_BYTES as u64 + 3);
        let bytes = storage.read("c").expect("read");
        let range = decode(&bytes, 77).expect("valid");
        assert_eq!(&bytes[range.clone()][..9], b"snapshot ");
        assert_eq!(range.len() as u64, len);
        assert_eq!(
            verify_stream(&bytes[..], bytes.len() as u64, 77),
            Ok(range.len() as u64)
        );
        assert!(verify_stream(&bytes[..], bytes.len() as u64, 78).is_err());
        assert!(decode(&bytes, 78).is_err());
        assert!(decode(&bytes[..bytes.len() - 1], 77).is_err());
        for offset in [
            0,
            8,
            15,
            16,
            20,
            bytes.len() - 16,
            bytes.len() - 5,
            bytes.len() - 1,
        ] {
            let mut damaged = bytes.clone();
            damaged[offset] ^= 4;
            assert!(decode(&damaged, 77).is_err(), "flip at {offset} undetected");
            assert!(
                verify_stream(&damaged[..], damaged.len() as u64, 77).is_err(),
                "flip at {offset} undetected while streaming"
            );
        }
    }
}
