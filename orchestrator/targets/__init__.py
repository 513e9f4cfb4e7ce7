"""Where a job runs: this machine (`local`) or a Ray cluster through its Jobs API
(`cluster`), behind one small interface (`base.Target`) that the CLI chooses once."""
