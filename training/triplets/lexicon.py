"""Word lists of the rules generator (rules.py): which words can be swapped for which.

Everything is lower case. The lists favour the vocabulary of COCO-style captions; a word missing
here only means a rule does not fire on it (the caption is then reported as not covered).
"""

from __future__ import annotations

DETERMINERS_SINGULAR = {"a", "an", "one", "this", "that", "another", "each", "every"}
DETERMINERS_PLURAL = {"two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "several", "many",
                      "some", "these", "those", "few", "multiple", "various", "numerous", "both"}
DETERMINERS_OTHER = {"the", "his", "her", "their", "its", "my", "our", "your"}
DETERMINERS = DETERMINERS_SINGULAR | DETERMINERS_PLURAL | DETERMINERS_OTHER

# Words that end a noun phrase: prepositions, conjunctions, relative pronouns, auxiliaries.
PREPOSITIONS = {"on", "in", "at", "with", "near", "by", "under", "over", "above", "below", "behind", "beside",
                "besides", "into", "onto", "from", "of", "to", "for", "through", "across", "along", "around",
                "against", "between", "inside", "outside", "underneath", "beneath", "toward", "towards", "during",
                "without", "upon", "off", "up", "down", "next", "atop", "amongst", "among", "while", "as", "like",
                "past", "beyond", "within", "out", "after", "before"}
CONJUNCTIONS = {"and", "or", "but", "while", "as", "so", "because", "then", "where", "when", "if", "yet"}
RELATIVE = {"that", "who", "which", "whose", "whom"}
AUXILIARIES = {"is", "are", "was", "were", "be", "been", "being", "has", "have", "had", "does", "do", "did", "can",
               "could", "will", "would", "may", "might", "should", "must", "'s"}
NEGATORS = {"not", "no", "never", "without", "nobody", "nothing", "none", "n't"}

# (base, third person singular, -ing form, past participle) of verbs frequent in captions.
# `True` in TRANSITIVE marks verbs whose object can become a passive subject.
_VERBS = """
sit sits sitting sat
stand stands standing stood
ride rides riding ridden
hold holds holding held
eat eats eating eaten
look looks looking looked
walk walks walking walked
play plays playing played
lay lays laying laid
lie lies lying lain
fly flies flying flown
park parks parking parked
wear wears wearing worn
carry carries carrying carried
throw throws throwing thrown
catch catches catching caught
hit hits hitting hit
swing swings swinging swung
drive drives driving driven
watch watches watching watched
use uses using used
cut cuts cutting cut
talk talks talking talked
read reads reading read
drink drinks drinking drunk
pose poses posing posed
run runs running run
jump jumps jumping jumped
sleep sleeps sleeping slept
rest rests resting rested
wait waits waiting waited
cross crosses crossing crossed
grab grabs grabbing grabbed
prepare prepares preparing prepared
cook cooks cooking cooked
feed feeds feeding fed
pull pulls pulling pulled
push pushes pushing pushed
chase chases chasing chased
graze grazes grazing grazed
surf surfs surfing surfed
ski skis skiing skied
skate skates skating skated
kick kicks kicking kicked
serve serves serving served
hang hangs hanging hung
show shows showing shown
display displays displaying displayed
lean leans leaning leaned
sail sails sailing sailed
float floats floating floated
travel travels traveling traveled
head heads heading headed
take takes taking taken
stare stares staring stared
smile smiles smiling smiled
laugh laughs laughing laughed
work works working worked
slice slices slicing sliced
open opens opening opened
sell sells selling sold
pet pets petting petted
hug hugs hugging hugged
brush brushes brushing brushed
wash washes washing washed
climb climbs climbing climbed
reach reaches reaching reached
point points pointing pointed
fix fixes fixing fixed
build builds building built
paint paints painting painted
buy buys buying bought
stop stops stopping stopped
swim swims swimming swum
go goes going gone
come comes coming come
fall falls falling fallen
land lands landing landed
follow follows following followed
lead leads leading led
bite bites biting bitten
lick licks licking licked
sniff sniffs sniffing sniffed
gather gathers gathering gathered
ski skis skiing skied
enjoy enjoys enjoying enjoyed
check checks checking checked
order orders ordering ordered
peck pecks pecking pecked
paw paws pawing pawed
gaze gazes gazing gazed
wait waits waiting waited
cover covers covering covered
fill fills filling filled
surround surrounds surrounding surrounded
approach approaches approaching approached
kiss kisses kissing kissed
type types typing typed
make makes making made
dig digs digging dug
talk talks talking talked
"""
VERB_FORMS: dict[str, tuple[str, str, str, str]] = {}  # any form -> (base, 3sg, ing, participle)
for _line in _VERBS.split("\n"):
    if _line.strip():
        _forms = tuple(_line.split())
        for _form in _forms[:3]:  # participles double as adjectives ("a parked car"): not verb markers
            VERB_FORMS.setdefault(_form, _forms)  # type: ignore[arg-type]
# -ing words that are nouns or adjectives, not participles.
ING_NOUNS = {"building", "buildings", "ceiling", "clothing", "painting", "paintings", "wedding", "evening",
             "morning", "king", "thing", "things", "something", "nothing", "anything", "everything", "string",
             "ring", "sling", "wing", "wings", "swing", "spring", "railing", "railings", "icing", "frosting",
             "topping", "toppings", "stuffing", "dressing", "filling", "sibling", "bedding", "parking", "living",
             "dining", "awning", "lighting", "pudding", "seasoning", "landing", "crossing", "opening", "setting",
             "background", "during", "ping", "sing", "ding", "ming", "boring", "amazing", "interesting",
             "outstanding", "surrounding", "surroundings", "clearing", "bring"}


class _IngForms(frozenset):
    """The lexicon's -ing forms, and any other -ing word of 6+ letters that is not a known noun ("trying")."""

    def __contains__(self, word: object) -> bool:
        if frozenset.__contains__(self, word):
            return True
        return isinstance(word, str) and len(word) >= 6 and word.endswith("ing") and word not in ING_NOUNS


ING_FORMS = _IngForms(forms[2] for forms in VERB_FORMS.values())
THIRD_PERSON_FORMS = {forms[1] for forms in VERB_FORMS.values()}
PARTICIPLES = {forms[3] for forms in VERB_FORMS.values()}

TRANSITIVE = {"hold", "ride", "eat", "carry", "throw", "catch", "hit", "swing", "drive", "watch", "use", "cut",
              "read", "drink", "grab", "prepare", "cook", "feed", "pull", "push", "chase", "kick", "serve", "fly",
              "slice", "open", "sell", "pet", "hug", "brush", "wash", "take", "buy", "wear", "climb", "lick",
              "approach", "kiss", "lead", "follow", "bite", "paint", "fix", "build", "sniff"}

# Meaning-preserving substitutions (paraphrases): phrase -> phrase. Longest match wins.
SYNONYMS: dict[str, str] = {
    "picture": "photo", "pictures": "photos", "photo": "picture", "photos": "pictures", "photograph": "photo",
    "image": "picture", "large": "big", "big": "large", "small": "little", "little": "small", "next to": "beside",
    "beside": "next to", "on top of": "atop", "couch": "sofa", "sofa": "couch", "bike": "bicycle",
    "bicycle": "bike", "bikes": "bicycles", "bicycles": "bikes", "motorbike": "motorcycle",
    "kid": "child", "child": "kid", "kids": "children", "children": "kids", "plane": "airplane",
    "airplane": "plane", "airplanes": "planes", "planes": "airplanes",
    "television": "tv", "tv": "television", "cell phone": "mobile phone", "cellphone": "mobile phone",
    "several": "a number of", "lots of": "many", "a lot of": "many", "a bunch of": "a group of",
    "filled with": "full of", "full of": "filled with", "underneath": "beneath", "beneath": "underneath",
    "above": "over", "ocean": "sea", "sea": "ocean", "woman": "lady", "women": "ladies", "lady": "woman",
    "ladies": "women", "guy": "man", "guys": "men", "talking": "speaking", "speaking": "talking",
    "automobile": "car", "road": "street", "street": "road", "roads": "streets", "streets": "roads",
    "refrigerator": "fridge", "fridge": "refrigerator",
    "grey": "gray", "gray": "grey", "close up": "close-up", "close-up": "close up",
    "persons": "people", "person": "individual", "puppy": "young dog",
    "kitten": "young cat", "racquet": "racket", "racket": "racquet", "mom": "mother", "dad": "father",
    "stuffed animal": "plush toy", "teddy bear": "stuffed bear", "mobile phone": "cell phone",
    "looking at": "viewing", "shows": "depicts", "displays": "shows", "colorful": "multicolored",
    "multicolored": "colorful", "grassy": "grass-covered", "wooden": "wood", "rock": "stone", "stone": "rock",
    "pathway": "path", "path": "pathway", "store": "shop", "shop": "store", "huge": "enormous",
    "enormous": "huge", "tiny": "very small", "begins": "starts", "starts": "begins", "near": "close to",
    "close to": "near", "outdoors": "outside", "seat": "chair", "cup": "mug", "mug": "cup",
    "kinds of": "types of", "kind of": "type of", "types of": "kinds of", "type of": "kind of",
    "various": "different", "many": "lots of", "under": "beneath",
    "laying": "lying", "is shown": "is pictured", "are shown": "are pictured",
    "bucket": "pail", "buckets": "pails", "cupboard": "cabinet", "cupboards": "cabinets", "cabinet": "cupboard",
    "cabinets": "cupboards", "donut": "doughnut", "donuts": "doughnuts", "doughnut": "donut",
    "doughnuts": "donuts", "sunglasses": "shades", "hauling": "pulling", 
    "motorcycle": "motorbike", "phone": "telephone", "frisbee": "flying disc",
    "sidewalk": "pavement", "inside of": "inside", "in the distance": "far away", "tabletop": "table top",
    "glowing": "shining", "climb up": "ascend", "cargo": "freight", 
}

# Meaning-changing substitutions (negations), by kind. Each maps a phrase to its replacement.
OPPOSITE_ATTRIBUTES: dict[str, str] = {
    "large": "small", "big": "small", "small": "large", "little": "big", "tall": "short", "short": "tall",
    "long": "short", "old": "new", "new": "old", "young": "old", "older": "younger", "younger": "older",
    "open": "closed", "closed": "open", "empty": "full", "full": "empty", "wet": "dry", "dry": "wet",
    "hot": "cold", "cold": "hot", "light": "dark", "dark": "bright", "bright": "dark", "clean": "dirty",
    "dirty": "clean", "happy": "sad", "sad": "happy", "thin": "thick", "thick": "thin", "wide": "narrow",
    "narrow": "wide", "high": "low", "low": "high", "fast": "slow", "slow": "fast", "male": "female",
    "female": "male", "sunny": "cloudy", "cloudy": "sunny", "asleep": "awake", "awake": "asleep",
    "smiling": "frowning", "lit": "dark", "busy": "empty", "crowded": "empty", "modern": "old-fashioned",
    "rainy": "sunny", "snowy": "sandy", "grassy": "sandy", "wooden": "metal", "metal": "wooden",
    "plastic": "glass", "indoor": "outdoor", "outdoor": "indoor", "cooked": "raw", "raw": "cooked",
    "white": "black", "black": "white", "red": "blue", "blue": "red", "green": "yellow", "yellow": "green",
    "brown": "gray", "gray": "brown", "grey": "brown", "orange": "purple", "purple": "orange", "pink": "green",
    "silver": "gold", "gold": "silver", "first": "last", "last": "first", "left": "right", "right": "left",
    "top": "bottom", "bottom": "top", "front": "back", "back": "front", "day": "night", "night": "day",
    "daytime": "nighttime", "nighttime": "daytime", "many": "few", "several": "no",
}
# Who can sit, stand or lie: posture edits ("sitting" -> "standing") are false only for them; a cup
# "sitting" on a desk is merely placed there, and "standing" would still be true.
ANIMATE = {"person", "people", "man", "men", "woman", "women", "child", "children", "kid", "kids", "boy", "boys",
           "girl", "girls", "baby", "babies", "dog", "dogs", "cat", "cats", "bird", "birds", "horse", "horses",
           "cow", "cows", "sheep", "zebra", "zebras", "giraffe", "giraffes", "elephant", "elephants", "bear",
           "bears", "player", "players", "lady", "ladies", "guy", "guys", "couple", "family", "group", "crowd",
           "skier", "skiers", "surfer", "surfers", "puppy", "kitten", "animal", "animals", "individual", "adult",
           "adults", "toddler", "student", "students", "monkey", "duck", "ducks", "goat", "goats", "pigeon",
           "pigeons", "seagull", "owl", "teddy", "he", "she", "they"}
POSTURES = {"sitting", "sits", "sit", "standing", "stands", "stand", "laying", "lying"}
MOTION_VERBS = {"walking", "walks", "running", "runs"}  # "walking a dog" is no gait: no "running a dog"
ATTRIBUTE_WORDS = {"white", "black", "red", "blue", "green", "yellow", "brown", "gray", "grey", "orange", "purple",
                   "pink", "silver", "gold", "large", "big", "small", "little", "tall", "short", "long", "old",
                   "young", "wooden", "metal", "plastic", "empty", "full", "open", "closed", "wet", "dry", "dark",
                   "bright", "clean", "dirty", "striped", "colorful", "tiny", "huge", "round", "square"}

RELATIONS: dict[str, str] = {
    "on top of": "underneath", "in front of": "behind", "behind": "in front of", "next to": "far from",
    "beside": "far from", "near": "far from", "above": "below", "below": "above", "under": "on top of",
    "underneath": "on top of", "beneath": "above", "inside": "outside", "outside": "inside", "into": "out of",
    "out of": "into", "toward": "away from", "towards": "away from", "away from": "toward",
    "on": "under", "over": "under", "with": "without", "without": "with", "before": "after",
    "after": "before",
    "sitting": "standing", "sits": "stands", "sit": "stand", "standing": "sitting",
    "stands": "sits", "stand": "sit", "walking": "running", "walks": "runs", "running": "walking",
    "runs": "walks", "holding": "dropping", "holds": "drops", "riding": "pushing", "rides": "pushes",
    "laying": "standing", "lying": "standing", "flying": "landing", "parked": "moving", "eating": "smelling",
    "looking at": "looking away from", "looks at": "looks away from", "playing": "watching",
    "plays": "watches", "wearing": "holding", "wears": "holds", "drinking": "spilling", "sleeping": "playing",
    "smiling": "crying", "throwing": "catching", "throws": "catches", "catching": "throwing",
    "catches": "throws", "pulling": "pushing", "pushing": "pulling", "entering": "leaving",
    "leaving": "entering", "covered": "uncovered", "filled": "emptied", "topped": "untopped",
    "grazing": "sleeping", "watching": "ignoring", "carrying": "dragging", "cutting": "holding",
    "taking": "dropping", "opening": "closing", "closing": "opening", "getting": "losing",
}

OBJECTS: dict[str, str] = {
    "dog": "cat", "cat": "dog", "dogs": "cats", "cats": "dogs", "horse": "cow", "cow": "horse",
    "horses": "cows", "cows": "horses", "car": "truck", "truck": "car", "cars": "trucks", "trucks": "cars",
    "bus": "train", "train": "bus", "buses": "trains", "trains": "buses", "man": "woman", "woman": "man",
    "men": "women", "women": "men", "boy": "girl", "girl": "boy", "boys": "girls", "girls": "boys",
    "pizza": "cake", "cake": "pizza", "pizzas": "cakes", "cakes": "pizzas", "table": "desk", "desk": "table",
    "plate": "bowl", "bowl": "plate", "plates": "bowls", "bowls": "plates", "fork": "spoon", "spoon": "fork",
    "knife": "fork", "bed": "couch", "couch": "bed", "kite": "balloon", "giraffe": "zebra", "zebra": "giraffe",
    "giraffes": "zebras", "zebras": "giraffes", "elephant": "rhino", "elephants": "rhinos",
    "bird": "squirrel", "birds": "squirrels", "skateboard": "surfboard", "surfboard": "skateboard",
    "snowboard": "sled", "tennis": "baseball", "baseball": "tennis", "bat": "racket", "racket": "bat",
    "umbrella": "hat", "hat": "helmet", "phone": "camera", "camera": "phone", "laptop": "book", "book": "laptop",
    "sink": "bathtub", "toilet": "sink", "pen": "pencil", "sandwich": "burger", "burger": "sandwich",
    "hot dog": "sandwich", "wine": "beer", "beer": "wine", "grass": "sand", "snow": "sand", "sand": "snow",
    "beach": "field", "field": "beach", "kitchen": "bathroom", "bathroom": "kitchen", "bedroom": "kitchen",
    "teddy bear": "doll", "mirror": "window", "window": "mirror", "apple": "orange", "banana": "carrot",
    "bananas": "carrots", "broccoli": "carrots", "chair": "bench", "bench": "chair", "chairs": "benches",
    "benches": "chairs", "frisbee": "ball", "ball": "frisbee", "clock": "sign", "sign": "clock", "boat": "car",
    "boats": "cars", "airplane": "helicopter", "plane": "helicopter", "motorcycle": "bicycle",
    "bicycle": "motorcycle", "bike": "motorcycle", "child": "dog", "baby": "puppy", "water": "grass",
    "tree": "pole", "trees": "buildings", "building": "tree", "street": "river", "road": "river",
    "sidewalk": "lawn", "vase": "bottle", "bottle": "vase", "cup": "bowl", "glass": "bowl", "bear": "dog",
    "bears": "dogs", "tie": "scarf", "shirt": "jacket", "jacket": "shirt", "suitcase": "backpack",
    "luggage": "furniture", "refrigerator": "oven", "oven": "refrigerator", "stove": "sink",
    "computer": "television", "tv": "computer", "television": "computer", "keyboard": "guitar",
    "donut": "bagel", "donuts": "bagels", "sandwiches": "burgers", "fruit": "bread", "vegetables": "cookies",
    "cheese": "chocolate", "chicken": "fish", "door": "window", "fence": "wall", "wall": "fence",
    "mountain": "building", "hill": "building", "ocean": "lake", "sky": "ceiling", "skis": "skates",
    "flowers": "vegetables", "animal": "vehicle", "animals": "vehicles", "player": "referee",
}
SINGULAR_OBJECTS = {word for word in OBJECTS
                    if not word.endswith("s") or word.endswith("ss") or word in ("bus", "tennis")}
UNCOUNTABLE = {"luggage", "grass", "snow", "sand", "water", "broccoli", "fruit", "cheese", "wine", "beer", "sky",
               "furniture", "tennis", "baseball", "chicken"}
