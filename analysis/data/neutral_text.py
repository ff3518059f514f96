"""Neutral text for the KL guard and the NLL check when none is given (and the model ships none).

Plain, fact-free sentences of everyday English: the patch must leave a model's predictions on text
like this alone. A model directory with a `neutral.txt` (the demo model has one) is used instead.
"""

from __future__ import annotations

DEFAULT_NEUTRAL: tuple[str, ...] = (
    "The weather was mild in the morning, so we walked to the market.",
    "She put the blue cup on the shelf next to the window.",
    "After lunch, the children played in the garden until it started to rain.",
    "He forgot his keys again and had to wait outside for an hour.",
    "The old clock in the kitchen stopped working last week.",
    "We will meet at the station at half past nine on Saturday.",
    "The dog slept on the floor while the cat watched the birds.",
    "It was a quiet evening, and the street was almost empty.",
    "My neighbour painted her front door a bright shade of green.",
    "The train was late, so I read a few chapters of my book.",
    "There are three chairs and a small table in the room.",
    "They bought bread, cheese and apples for the picnic.",
    "The road to the village was long and full of turns.",
    "I wrote a short letter and left it on the desk.",
    "The wind picked up in the afternoon and the sky turned grey.",
    "Please close the window before you leave the house.",
    "The teacher asked the students to open their notebooks.",
    "We walked along the river and watched the boats go by.",
    "The coffee was too hot, so he waited a few minutes.",
    "On Sundays the park is full of families and dogs.",
    "She found an old photograph inside a box in the attic.",
    "The shop on the corner closes early on Mondays.",
    "It took them two hours to clean the whole kitchen.",
    "A small bird landed on the fence and sang for a while.",
    "He likes to cook dinner while listening to the radio.",
    "The lamp on the table gave off a warm yellow light.",
    "We counted the boxes twice to make sure none were missing.",
    "The bus stopped in front of the school at eight o'clock.",
    "Her bag was heavy because it was full of books.",
    "They sat by the fire and talked until late at night.",
    "The floor was wet, so everyone walked around the puddle.",
    "I will call you when I get home this evening.",
    "The children laughed at the funny story their father told.",
    "A light rain fell all day, and the streets were shiny.",
    "He moved the chair closer to the window to read.",
    "The bakery smelled of fresh bread early in the morning.",
    "We planted tomatoes and beans in the garden this spring.",
    "The meeting was short, and everyone left before noon.",
    "She wrapped the present in red paper and tied a ribbon.",
    "The path through the forest was covered with leaves.",
)
