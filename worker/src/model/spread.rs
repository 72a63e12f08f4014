//! A model's blocks spread over several devices in contiguous ranges: how a pruned model larger
//! than one GPU is evaluated at full speed on several (`worker eval --device cuda:0,cuda:1`).
//!
//! The embedding, the final norm and the LM head stay on the first device, where every pass
//! starts and ends; block `l` runs on the device its range gives it, and the residual stream
//! moves to the next device where a range ends (one `[B, T, H]` copy per device boundary per
//! pass). Each block is read from the checkpoint straight onto its device
//! ([`Decoder::load_offloaded`] first), so no device and not the host ever holds the whole model.
//! The ranges follow the room each device has ([`layer_ranges`]). Healing, quantizing and writing
//! need the model on one device and refuse a spread one.
//!
//! On a CPU, `--device cpu,cpu` runs exactly this logic (the copies between devices are then no
//! copies), which is how the tests cover it.

use std::ops::Range;

use candle_core::Device;

use super::decoder::Decoder;
use super::ModelError;

/// Splits blocks of `block_bytes` (in order) into one contiguous range per device, each device's
/// share of the bytes following its share of `room`, and no range holding more than its device's
/// room. A device may get an empty range when there are fewer blocks than devices. Fails, saying
/// what is missing, when the blocks do not fit.
pub fn layer_ranges(block_bytes: &[u64], room: &[u64]) -> Result<Vec<Range<usize>>, String> {
    if room.is_empty() {
        return Err("no device to put the blocks on".into());
    }
    let total: u128 = block_bytes.iter().map(|&b| u128::from(b)).sum();
    let capacity: u128 = room.iter().map(|&r| u128::from(r)).sum();
    if total > capacity {
        return Err(format!("the blocks need {} and the devices have room for {}", gib(total), gib(capacity)));
    }
    let (mut ranges, mut start, mut placed, mut room_so_far) = (Vec::with_capacity(room.len()), 0, 0u128, 0u128);
    for (d, &device_room) in room.iter().enumerate() {
        room_so_far += u128::from(device_room);
        // The bytes the devices up to this one should hold between them; the last takes the rest.
        let target = if d + 1 == room.len() { total } else { total * room_so_far / capacity.max(1) };
        let (mut end, mut held) = (start, 0u128);
        while end < block_bytes.len() {
            let bytes = u128::from(block_bytes[end]);
            // A block goes here when most of it falls before the target and it fits.
            let wanted = d + 1 == room.len() || placed + held + bytes / 2 <= target;
            if !wanted || held + bytes > u128::from(device_room) {
                break;
            }
            (end, held) = (end + 1, held + bytes);
        }
        placed += held;
        ranges.push(start..end);
        start = end;
    }
    if start < block_bytes.len() {
        return Err(format!(
            "blocks {start} to {} do not fit: no block can go across devices, and the last device's room is full",
            block_bytes.len() - 1
        ));
    }
    Ok(ranges)
}

/// `bytes` in GiB, for messages.
fn gib(bytes: u128) -> String {
    format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30))
}

impl Decoder {
    /// Holds the kept blocks on `devices` in contiguous ranges ([`layer_ranges`] over each device's
    /// `room` in bytes), each read from the checkpoint onto its device; returns the ranges, as
    /// positions among the kept blocks. The model must come from [`Decoder::load_offloaded`] with
    /// no block held yet, and `devices[0]` must be its own device. When the blocks do not fit,
    /// nothing is held.
    pub fn spread(&mut self, devices: &[Device], room: &[u64]) -> Result<Vec<Range<usize>>, ModelError> {
        let fail = |why: String| Err(ModelError::Spread(why));
        if devices.len() != room.len() {
            return fail(format!("{} devices and {} room figures", devices.len(), room.len()));
        }
        if !devices.first().is_some_and(|d| d.same_device(self.device())) {
            return fail("the first device must be the one the model was loaded on".into());
        }
        let Some(bytes) = self.blocks.iter().map(|b| b.offloaded_bytes()).collect::<Option<Vec<_>>>() else {
            return fail("the model's blocks are held already: load it with its blocks left in the checkpoint".into());
        };
        let ranges = layer_ranges(&bytes, room).map_err(|why| {
            ModelError::Spread(format!(
                "the {} kept blocks cannot be spread over {} devices: {why}; add a device, or read some blocks \
                 for each pass on one device instead (worker eval --hold-gib)",
                self.blocks.len(),
                devices.len()
            ))
        })?;
        for (range, device) in ranges.iter().zip(devices) {
            for block in &mut self.blocks[range.clone()] {
                block.device = device.clone();
                block.hold(u64::MAX)?;
            }
        }
        self.blocks_spread = true;
        Ok(ranges)
    }

    /// Whether the blocks are spread over several devices ([`Decoder::spread`]).
    pub fn is_spread(&self) -> bool {
        self.blocks_spread
    }
}

#[cfg(test)]
mod tests;
