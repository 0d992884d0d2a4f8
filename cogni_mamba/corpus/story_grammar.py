"""The story grammar: every word a built-in story can contain lives in the tables of this module.

Templates are sentences with `{slot}` fields; a capitalised slot (`{He}`, `{Hero}`) is the same value
with its first letter in upper case. `stories.py` fills the slots and strings beats into plots; the
corpus vocabulary is read off these tables, so it is exactly what the grammar can produce.
"""

from __future__ import annotations

# --- characters -------------------------------------------------------------------------------

GIRL_NAMES = ("Lily", "Mia", "Sue", "Anna", "Zoe", "Lucy", "Ella", "Rosie", "Bella", "Molly", "Emma", "Ruby",
              "Daisy", "Nina", "Sara", "Kate", "Amy", "Lola", "Ivy", "Maya")
BOY_NAMES = ("Tom", "Max", "Ben", "Sam", "Leo", "Tim", "Jack", "Finn", "Toby", "Luke", "Jake", "Noah", "Ollie",
             "Dan", "Bob", "Pip", "Ned", "Rex", "Joe", "Milo")
PEOPLE_KINDS = {"she": ("girl",), "he": ("boy",)}
ANIMAL_KINDS = ("rabbit", "bear", "fox", "cat", "dog", "bird", "duck", "mouse", "frog", "turtle", "owl", "lion",
                "pig", "squirrel", "puppy", "kitten", "bunny", "hedgehog", "deer", "goat", "penguin", "dragon",
                "robot", "elephant", "monkey")
# (article + adjective) pairs, so "a"/"an" is always right.
A_ADJECTIVES = ("a little", "a small", "a happy", "a kind", "a brave", "a shy", "a curious", "a silly", "a clever",
                "a friendly", "a sleepy", "a tiny", "a playful", "a gentle", "an old", "a young", "a cheerful")
PRONOUNS = {
    "she": {"he": "she", "him": "her", "his": "her", "himself": "herself"},
    "he": {"he": "he", "him": "him", "his": "his", "himself": "himself"},
}
HELPERS = ("Mom", "Dad", "Grandma", "Grandpa", "the teacher", "a wise old owl", "the big brother",
           "the kind farmer", "Aunt May", "Uncle Bill")
FAMILY = ("mom", "dad", "sister", "brother", "grandma", "grandpa")

# --- the world --------------------------------------------------------------------------------

PLACES = ("park", "forest", "garden", "beach", "farm", "school", "river", "hill", "town", "pond", "meadow",
          "playground", "library", "lake", "zoo", "yard")
FAR_PLACES = ("the big forest", "the top of the hill", "the other side of the river", "an old cave",
              "the end of the beach", "the sunny meadow", "the little island", "the tall mountain")
OBJECTS = ("ball", "kite", "hat", "teddy bear", "toy boat", "book", "drum", "doll", "toy car", "scarf", "shell",
           "wagon", "balloon", "spoon", "blanket", "box", "bell", "crayon", "cup", "train")
COLOURS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "white", "black", "gold", "silver")
ACTIVITIES = ("play in the sun", "sing songs", "read books", "run and jump", "draw pictures", "dance", "build towers",
              "look at the stars", "splash in puddles", "pick flowers", "play with {his} friends", "bake cookies")
TIMES = ("morning", "day", "afternoon", "evening", "sunny day", "rainy day", "cold morning", "warm night")
GAMES = ("hide and seek", "tag", "catch", "a fun game", "pretend", "ball", "chase")
SEARCH_SPOTS = ("under the big tree", "behind a rock", "near the pond", "in the tall grass", "under a bench",
                "next to the flowers", "inside an old box", "by the gate", "under the slide", "in a pile of leaves")
STUCK_SPOTS = ("high up in a tree", "on the roof", "in a thorny bush", "on top of a tall wall", "in the middle of the pond")
SIGHTS = ("a bright rainbow", "a family of ducks", "a shiny stone", "a tiny door in a tree", "a field of flowers",
          "a baby deer", "a sparkling waterfall", "a big nest full of eggs", "a secret path")
FOODS = ("apples", "sandwiches", "cookies", "bread and jam", "carrots", "cheese", "berries", "a cake")
GIFTS = ("a card with a {colour} flower on it", "a necklace made of shells", "a small cake", "a picture of them "
         "together", "a little {colour} hat", "a box full of shiny stones", "a song")
LOST_ANIMALS = ("a baby bird", "a little kitten", "a tiny duckling", "a small puppy", "a baby rabbit", "a lost lamb")

GOOD_FEELINGS = ("happy", "glad", "proud", "excited", "calm", "warm inside", "very happy")
BAD_FEELINGS = ("sad", "worried", "scared", "lonely", "upset", "grumpy")

# --- the story ------------------------------------------------------------------------------

OPENINGS = (
    "Once upon a time, there was {hero_intro}.",
    "One {time}, {hero_intro} went to the {place}.",
    "{Hero} was {a_adj} {kind} who lived near the {place}.",
    "There once was {hero_intro}.",
    "Once there was {hero_intro} who lived in a small house by the {place}.",
)
TRAITS = (
    "{He} loved to {activity}.",
    "Every day, {he} liked to {activity}.",
    "{He} liked to {activity} with {his} {family}.",
    "More than anything, {hero} loved to {activity}.",
)

# Each plot is a list of beats; a beat is a list of alternative sentences (several beats hold two).
PLOTS: dict[str, list[tuple[str, ...]]] = {
    "lost": [
        ("{Hero} had a {colour} {object}. It was {his} favourite toy.",
         "{Hero} had a {colour} {object} that {he} took everywhere.",
         "{Hero}'s favourite toy was a {colour} {object}."),
        ("One day, {he} took it to the {place} to play.",
         "One {time}, {he} played with it at the {place}."),
        ("When it was time to go home, the {object} was gone!",
         "After a while, {hero} looked around. The {object} was not there!"),
        ("\"Oh no! Where is my {object}?\" {hero} cried. {He} felt very {bad}.",
         "{Hero} felt {bad}. \"I lost my {object}!\" {he} said."),
        ("{Friend}, {friend_desc}, saw {him}. \"Why are you {bad}?\" asked {friend}.",
         "Just then, {friend_intro} came by. \"What is wrong?\" asked {friend}."),
        ("\"I lost my {object},\" said {hero}. \"I will help you look for it,\" said {friend}.",
         "\"My {object} is lost,\" said {hero}. \"Let us find it together,\" said {friend}."),
        ("They looked {spot}. It was not there. They looked {spot2}. It was not there too.",
         "First they looked {spot}. Then they looked {spot2}. They could not find it."),
        ("At last, {friend} shouted, \"I see it! It is {spot3}!\"",
         "Then {hero} saw something {colour} {spot3}. It was the {object}!"),
        ("{Hero} hugged {his} {object} and felt {good}. \"Thank you, {friend}!\" {he} said.",
         "{Hero} was so {good}. \"You are a good friend, {friend},\" {he} said."),
    ],
    "new_friend": [
        ("One {time}, {hero} saw {friend_intro} sitting alone at the {place}.",
         "At the {place}, {hero} met {friend_intro} for the first time."),
        ("The {fkind} looked {bad}.", "The {fkind} was quiet and looked at the ground."),
        ("\"Hello! What is your name?\" asked {hero}. \"I am {friend},\" said the {fkind} softly.",
         "{Hero} walked over and said, \"Hi! I am {hero}. Who are you?\" \"My name is {friend},\" said the {fkind}."),
        ("\"Do you want to play {game}?\" asked {hero}. {Friend} smiled. \"Yes, please!\"",
         "\"Would you like to play {game} with me?\" asked {hero}. {Friend} nodded and smiled."),
        ("They played {game} all {time}. They laughed and ran and had lots of fun.",
         "They played together until the sun went down. {Friend} was not {bad} anymore."),
        ("\"Will you come back tomorrow?\" asked {friend}. \"Yes, I will!\" said {hero}.",
         "When it was time to go, {friend} said, \"Thank you for playing with me.\""),
    ],
    "stuck": [
        ("One {time}, {hero} was playing with {his} {colour} {object} at the {place}.",
         "{Hero} took {his} new {object} to the {place} to play."),
        ("Suddenly, a big wind came and the {object} flew away. It got stuck {stuck}!",
         "{Hero} threw the {object} too high, and it got stuck {stuck}."),
        ("{Hero} jumped and jumped, but {he} could not reach it.",
         "{Hero} tried to reach it with a stick, but it was too far away."),
        ("{He} felt {bad}. \"What can I do?\" {he} said.",
         "\"I will never get it back,\" {hero} said, and {he} felt {bad}."),
        ("Then {helper} came by. \"Do not worry, I can help,\" said {helper}.",
         "{Hero} ran to get {helper}. \"Please help me!\" {he} said."),
        ("{Helper} got a long ladder and climbed up slowly. Soon the {object} was back in {hero}'s hands.",
         "{Helper} had a clever idea and used a long pole. The {object} fell down, and {hero} caught it."),
        ("\"Thank you so much!\" said {hero}. {He} felt {good} again.",
         "{Hero} gave {helper} a big hug. \"Thank you for helping me!\""),
    ],
    "sharing": [
        ("{Hero} got a new {colour} {object}. {He} loved it very much.",
         "One {time}, {hero} found a shiny {colour} {object} in the {place}."),
        ("{Friend}, {friend_desc}, came over. \"Can I play with your {object} too?\" asked {friend}.",
         "{Friend} saw the {object}. \"Can I have a turn, please?\" {fhe} asked."),
        ("\"No! It is mine!\" said {hero}. {Friend} felt {bad} and walked away.",
         "{Hero} held the {object} tight and said, \"No, you cannot have it!\" {Friend} looked {bad}."),
        ("{Hero} played with the {object} alone, but it was not much fun.",
         "{Hero} played by {himself}, but soon {he} felt {bad} too."),
        ("{He} walked to {friend} and said, \"I am sorry. Let us play together.\"",
         "{Hero} ran after {friend}. \"I am sorry, {friend}. You can have a turn.\""),
        ("{Friend} smiled, and they took turns with the {object}. It was much more fun.",
         "They played with the {object} together, and they both felt {good}."),
    ],
    "adventure": [
        ("One {time}, {hero} and {friend} wanted to go to {far}.",
         "\"Let us go on an adventure!\" said {hero} to {friend}, {friend_desc}."),
        ("They packed a bag with {food} and a {colour} {object}.",
         "{Hero} put some {food} in a bag, and off they went."),
        ("They walked and walked. They saw tall trees and heard birds sing.",
         "The path was long, but they sang songs to make it short."),
        ("When they got to {far}, they saw {sight}!",
         "At last they came to {far}. There, they found {sight}."),
        ("\"Wow!\" said {friend}. \"This is so beautiful!\"",
         "{Hero} could not believe {his} eyes. \"Look at that!\" {he} said."),
        ("They sat down, ate their {food}, and looked at {sight} for a long time.",
         "They stayed a while and played, and then they went home before dark."),
        ("At home, {hero} told {his} {family} all about the adventure.",
         "That night, {hero} dreamed about {sight}."),
    ],
    "fear": [
        ("One night, there was a big storm. The thunder went boom!",
         "One night, {hero} could not sleep. It was very dark in {his} room.",
         "One {time}, a big dog barked at {hero} at the {place}."),
        ("{Hero} was scared. {He} hid under {his} {colour} blanket.",
         "{Hero} felt scared and started to cry."),
        ("{Helper} came and sat next to {him}. \"What is wrong?\" asked {helper}.",
         "Then {helper} came. \"Why are you crying?\" {helper} asked softly."),
        ("\"I am scared,\" said {hero}. \"It is all right. You are safe with me,\" said {helper}.",
         "\"I do not like it,\" said {hero}. \"It cannot hurt you. Let us be brave together,\" said {helper}."),
        ("They sang a quiet song and counted to ten.",
         "{Helper} told {him} a funny story, and {hero} began to laugh."),
        ("Soon {hero} did not feel scared anymore. {He} felt {good}.",
         "After a while, {hero} felt calm and brave."),
    ],
    "gift": [
        ("Soon it was {friend}'s birthday. {Friend} was {friend_desc}.",
         "{Hero} wanted to give {friend} a present for {fhis} birthday."),
        ("{Hero} did not have any money, so {he} wanted to make a gift.",
         "{Hero} thought and thought. \"I will make something,\" {he} said."),
        ("{He} made {gift}. It took a long time, but {he} did not give up.",
         "With help from {helper}, {hero} made {gift}."),
        ("On the birthday, {hero} gave the gift to {friend}.",
         "At the party, {hero} said, \"Happy birthday, {friend}! This is for you.\""),
        ("\"I love it! This is the best gift ever!\" said {friend}.",
         "{Friend} opened the gift and smiled a big smile. \"Thank you, {hero}!\""),
        ("{Hero} felt {good}. Making a gift was even better than getting one.",
         "They ate cake and played {game} until it was time to go home."),
    ],
    "helping": [
        ("One {time}, {hero} was walking in the {place}.",
         "{Hero} went to the {place} to {activity}."),
        ("{He} heard a small sound. It was {lost_animal}, and it was all alone.",
         "Suddenly, {he} saw {lost_animal} near a bush. It looked {bad}."),
        ("\"Are you lost?\" asked {hero} in a soft voice.",
         "\"Do not be afraid. I will help you,\" said {hero}."),
        ("{Hero} looked {spot} and {spot2} for its mother.",
         "{Hero} and {friend} carried it carefully and looked for its home."),
        ("At last, they found its mother {spot3}. She was so glad to see her baby.",
         "Soon they heard a loud call. It was the mother! The baby ran to her."),
        ("\"Thank you for helping my baby,\" said the mother.",
         "The mother was very thankful, and {hero} felt {good}."),
    ],
}

ENDINGS = (
    "From that day on, {hero} and {friend} were best friends.",
    "That night, {hero} went to sleep with a big smile.",
    "And they all lived happily ever after.",
    "{Hero} learned that it is good to ask for help.",
    "{Hero} learned that sharing makes everyone happy.",
    "{Hero} learned that a good friend is the best gift of all.",
    "{Hero} learned that being kind is always the right thing to do.",
    "It was the best day ever.",
    "The end.",
)
# Which endings fit which plot (indexes into ENDINGS).
PLOT_ENDINGS = {
    "lost": (0, 1, 2, 6), "new_friend": (0, 1, 5, 7), "stuck": (1, 3, 2, 7), "sharing": (4, 0, 2),
    "adventure": (1, 7, 2, 8), "fear": (1, 3, 8), "gift": (5, 0, 7, 2), "helping": (6, 1, 7, 2),
}

# Templates a story request in a chat can name ("a story about a fox") also use these words.
STORY_TOPICS = ("a {kind}", "a {kind} named {hero}", "a {colour} {object}", "the {place}", "friends",
                "being brave", "sharing", "an adventure", "a birthday")
