"""The native beamloop stream: :mod:`~beamloop.streams.native.protocol` (message layout, after DECTRIS Stream V2),
:mod:`~beamloop.streams.native.sender` (:class:`~beamloop.streams.native.sender.FrameSender`) and
:mod:`~beamloop.streams.native.receiver` (:class:`~beamloop.streams.native.receiver.FrameReceiver`)."""
