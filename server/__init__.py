"""bon's server: best-of-N sampling, Bradley-Terry scoring, selection, the candidate log.

Data flows one way: request schema (protocol) -> sampler (N candidates) -> scorer (rewards) ->
selection -> response, with the candidate log fed on the side. This package never imports
`trainers`; the trainers may use its inference core.
"""
