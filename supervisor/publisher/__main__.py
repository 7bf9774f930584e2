import sys

from supervisor.publisher.process import main

sys.exit(main(sys.argv[1:]))
