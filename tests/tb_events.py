"""Read tensorboard event files back without tensorboard: the TFRecord framing and tensorboardX's protos."""
import struct
from pathlib import Path


def read_events(directory):
    """Every ``Event`` in the ``events.out.tfevents.*`` files under ``directory`` (recursively), in file order."""
    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted(Path(directory).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        position = 0
        while position + 12 <= len(data):  # u64 length, u32 crc, payload, u32 crc
            (length,) = struct.unpack("<Q", data[position:position + 8])
            position += 12
            events.append(event_pb2.Event.FromString(data[position:position + length]))
            position += length + 4
    return events


def summary_values(directory):
    """``[(tag, step, Summary.Value), ...]`` of every summary value under ``directory``."""
    return [(value.tag, event.step, value) for event in read_events(directory) if event.HasField("summary")
            for value in event.summary.value]
