import sys

from tests.fault_campaign.cli import main

sys.exit(main())
