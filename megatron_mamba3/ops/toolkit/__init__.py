"""The shared pieces every backend builds on, and the oracle too: rotary angles (`rotary`), per-head
keys and rank values and the incoming state (`heads`), the norm and output gate (`gate`), packed rows
and their states (`packing`), the non-finite bookkeeping (`finite`) and the one-chunk step of the
chunked form (`chunk`). Import them from their modules."""
